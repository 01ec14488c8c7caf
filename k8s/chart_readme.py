"""Chart READMEs' parameter tables, generated from the `# --` comments of each chart's values.yaml.

The table is rendered by Bitnami's readme generator (npm `@bitnami/readme-generator-for-helm`, pinned
below), which reads `## @param <key> <description>` metadata. Our values files keep the one-line
`# -- description` above each value (what `tests/test_charts.py` checks); `annotate` turns those into
Bitnami's metadata on a temporary copy, so the comments stay the single source.

    python -m k8s.chart_readme            # rewrite the `## Parameters` section of both chart READMEs
    python -m k8s.chart_readme --check    # exit 1 when a README is not current (CI)

The generator is found as $README_GENERATOR, else `readme-generator` on PATH (install it with
`npm install -g @bitnami/readme-generator-for-helm@2.7.2`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer import env

GENERATOR_PACKAGE = "@bitnami/readme-generator-for-helm@2.7.2"
CHARTS = Path(__file__).resolve().parent / "charts"
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z][\w-]*):")


def annotate(values_text: str, section: str = "Values") -> str:
    """values.yaml with `## @param path description` before every `# --`-documented key."""
    out = [f"## @section {section}", ""]
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing maps
    lines = values_text.splitlines()
    for i, line in enumerate(lines):
        match = _KEY.match(line)
        if match:
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([k for _, k in stack] + [match["key"]])
            previous = lines[i - 1].strip() if i else ""
            if previous.startswith("# --"):
                out.append(f"{match['indent']}## @param {path}{_modifier(line, lines[i + 1 :])} {previous[4:].strip()}")
            stack.append((indent, match["key"]))
        out.append(line)
    return "\n".join(out) + "\n"


def _modifier(line: str, rest: list[str]) -> str:
    """` [object]` / ` [array]` for a value written as a nested block (documented as one value)."""
    if line.split(":", 1)[1].split("#", 1)[0].strip():
        return ""  # an inline value: a leaf
    following = next((n for n in rest if n.strip() and not n.strip().startswith("#")), "")
    if len(following) - len(following.lstrip()) <= len(line) - len(line.lstrip()) and not following.lstrip().startswith(
        "-"
    ):
        return ""
    return " [array]" if following.lstrip().startswith("-") else " [object]"


def generator() -> list[str] | None:
    found = env.readme_generator() or shutil.which("readme-generator")
    return [found] if found else None


def render_readme(chart: Path, command: list[str]) -> str:
    """The chart's README with its `## Parameters` section regenerated (the file itself is untouched)."""
    with tempfile.TemporaryDirectory() as tmp:
        values, readme = Path(tmp, "values.yaml"), Path(tmp, "README.md")
        values.write_text(annotate((chart / "values.yaml").read_text()))
        readme.write_text((chart / "README.md").read_text())
        done = subprocess.run(
            [*command, "--values", str(values), "--readme", str(readme)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{GENERATOR_PACKAGE} failed on {chart.name}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return readme.read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s.chart_readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the READMEs are current")
    args = parser.parse_args(argv)
    command = generator()
    if command is None:
        print(
            f"error: no readme generator: npm install -g {GENERATOR_PACKAGE}, or set README_GENERATOR", file=sys.stderr
        )
        return 2
    stale = []
    for chart in sorted(p for p in CHARTS.iterdir() if (p / "Chart.yaml").is_file()):
        new = render_readme(chart, command)
        if new != (chart / "README.md").read_text():
            stale.append(chart.name)
            if not args.check:
                (chart / "README.md").write_text(new)
    if args.check and stale:
        print(f"stale README(s): {', '.join(stale)}: run python -m k8s.chart_readme", file=sys.stderr)
        return 1
    print(("updated: " + ", ".join(stale)) if stale and not args.check else "READMEs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
