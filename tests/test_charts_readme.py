"""The chart READMEs' parameter tables are generated from the values files' `# --` comments
(`python -m k8s.chart_readme`, Bitnami's readme generator) and must be current."""

from __future__ import annotations

import pytest

from k8s import chart_readme

pytestmark = pytest.mark.helm


def test_annotate_should_turn_each_documented_value_into_bitnami_metadata():
    text = (
        '# -- The image.\nimage:\n  # -- Repository.\n  repository: ""\n  tag: x\n'
        "# -- A map documented as one value.\npodSecurityContext:\n  runAsNonRoot: true\n"
        "# -- A list.\ntolerations:\n  - key: a\n# -- Inline.\nlabels: {}\n"
    )
    out = chart_readme.annotate(text)
    assert out.startswith("## @section Values\n")
    assert "## @param image [object] The image." in out and "  ## @param image.repository Repository." in out
    assert "## @param podSecurityContext [object] A map documented as one value." in out
    assert "## @param tolerations [array] A list." in out and "## @param labels Inline." in out
    assert "image.tag" not in out  # undocumented: the generator reports it


@pytest.mark.parametrize("chart", sorted(p.name for p in chart_readme.CHARTS.iterdir() if (p / "Chart.yaml").is_file()))
def test_every_documented_value_should_reach_the_readme_table(chart):
    values = (chart_readme.CHARTS / chart / "values.yaml").read_text()
    params = [
        line.split("@param ", 1)[1].split()[0]
        for line in chart_readme.annotate(values).splitlines()
        if "@param " in line
    ]
    readme = (chart_readme.CHARTS / chart / "README.md").read_text()
    assert "## Parameters" in readme
    missing = [p for p in params if f"`{p}`" not in readme]
    assert missing == [], f"run python -m k8s.chart_readme ({missing[:5]})"


@pytest.mark.skipif(
    chart_readme.generator() is None,
    reason=f"readme generator not installed (npm install -g {chart_readme.GENERATOR_PACKAGE}, or set README_GENERATOR)",
)
def test_chart_readmes_should_be_what_the_generator_writes():
    assert chart_readme.main(["--check"]) == 0
