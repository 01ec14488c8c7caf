"""Issue 15's hostile requests, measured against the decoder and the request parsing, before and after.

"Before" is the code at d8af4db (`trainer/serve/codecs.py` read from git, plus `json.loads` and
`predictor.validate_clicks` as the routes called them); "after" is this checkout. Each row runs in
this process, timed with `perf_counter` and its peak Python/numpy allocation measured with
`tracemalloc`. Rows whose "before" would take minutes or GiB are measured at a smaller size and the
size is recorded. Writes `benchmarks/hostile.json` and `benchmarks/hostile.md`.

    PYTHONPATH=$PWD:tests python scripts/bench_hostile.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import hostile_inputs as hi  # noqa: E402
import numpy as np  # noqa: E402

from trainer.serve.errors import ApiError  # noqa: E402

BEFORE_COMMIT = "d8af4db"


def old_codecs():
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:trainer/serve/codecs.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    mod = types.ModuleType("old_codecs")
    sys.modules["old_codecs"] = mod  # dataclasses look their module up
    exec(
        compile(
            src.replace("from .errors import ApiError", "from trainer.serve.errors import ApiError"),
            "old_codecs",
            "exec",
        ),
        mod.__dict__,
    )
    return mod


def _call(fn, *args):
    t0 = time.perf_counter()
    try:
        fn(*args)
        outcome = 200
    except ApiError as exc:
        outcome = exc.status
    except Exception as exc:  # noqa: BLE001 - "before" answered these with a 500
        outcome = f"500 ({type(exc).__name__})"
    return outcome, time.perf_counter() - t0


def measure(fn, *args) -> dict:
    """Outcome (the HTTP status the route would answer), seconds (untraced run) and peak traced bytes.

    The peak comes from a second run under tracemalloc (which slows Python code several times), done
    only when the first took under 20 s.
    """
    outcome, seconds = _call(fn, *args)
    peak = None
    if seconds < 20:
        tracemalloc.start()
        _call(fn, *args)
        peak = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    return {"outcome": outcome, "seconds": round(seconds, 4), "peak_mib": peak}


def old_clicks(body: bytes, shape):
    from trainer.predictor import validate_clicks

    return validate_clicks(json.loads(body), shape)


def new_clicks(body: bytes, shape):
    from trainer.serve.inputs import check_clicks, parse_json

    return check_clicks(parse_json(body, "clicks", 64 * 1024), shape, 512)


def old_full(data: bytes, _shape):
    """Old decode, then the predictor's preprocessing (where a sheared sform failed), tiny profile."""
    from trainer.config import get_profile
    from trainer.network import build_network
    from trainer.predictor import Predictor

    image, affine = OLD.decode_nifti(data, OLD.VolumeLimits())
    Predictor(build_network(get_profile("tiny")), get_profile("tiny")).preprocess(image, affine)


def rows(quick: bool) -> list[dict]:
    import trainer.predictor  # noqa: F401 - imported once here, so no row is charged torch's import
    from trainer.serve.codecs import VolumeLimits, decode_nifti

    old_limits = OLD.VolumeLimits()
    new_limits = VolumeLimits()
    shape = (512, 512, 256)
    out = []

    def row(name: str, size: str, before_input, after_input, before_fn=None, after_fn=None, note: str = "") -> None:
        before = measure(before_fn or OLD.decode_nifti, before_input, old_limits if before_fn is None else shape)
        after = measure(after_fn or decode_nifti, after_input, new_limits if after_fn is None else shape)
        out.append({"row": name, "size": size, "before": before, "after": after, "note": note})
        print(f"{name:55s} before {before}  after {after}", flush=True)

    n_before = 100_000 if quick else 400_000
    bomb = hi.extension_records_bomb(n_before)
    row("extension records", f"{n_before} records, {len(bomb) // 1024} KiB upload", bomb, bomb)
    big = hi.extension_records_bomb(8_000_000)
    out.append(
        {
            "row": "extension records (issue size)",
            "size": f"8 M records, {len(big) // 1024} KiB upload",
            "before": {"outcome": "not run", "note": "extrapolated: 16 us and 144 B per record -> ~130 s, >1 GiB"},
            "after": measure(decode_nifti, big, new_limits),
        }
    )
    print("extension records 8M after", out[-1]["after"], flush=True)

    small = hi.nifti_bytes(np.zeros((4, 4, 4), np.int16))
    for n in (10_000, 20_000) if quick else (20_000, 40_000, 80_000):
        data = hi.empty_members_bomb(n, small)
        row("gzip empty members", f"{n} members, {len(data) // 1024} KiB", data, data)
    data = hi.empty_members_bomb(640_000, small)
    out.append(
        {
            "row": "gzip empty members (issue size)",
            "size": f"640 k members, {len(data) // 2**20} MiB",
            "before": {"outcome": "not run", "note": "quadratic: ~100 s (issue 15; 4x per doubling above)"},
            "after": measure(decode_nifti, data, new_limits),
        }
    )
    print("gzip 640k after", out[-1]["after"], flush=True)

    scaled = (128, 128, 128) if quick else (256, 256, 256)
    z = hi.declared_zeros_bomb(scaled)
    row(
        "declared float64 zeros (scaled)",
        f"{'x'.join(map(str, scaled))} float64, {len(z) // 1024} KiB upload",
        z,
        z,
        note="inside every limit before and after: after, the replica's memory budget admits it (see work_bytes)",
    )
    if not quick:
        full = hi.declared_zeros_bomb()
        out.append(
            {
                "row": "declared float64 zeros (issue size)",
                "size": f"512x512x1024 float64, {len(full) // 2**20} MiB upload",
                "before": {
                    "outcome": 200,
                    "note": "not run here: ~5 GiB peak (2 GiB inflate + float64 + float32 copies)",
                },
                "after": measure(decode_nifti, full, new_limits),
            }
        )
        print("declared zeros full after", out[-1]["after"], flush=True)

    body = hi.many_clicks_body(200_000 if not quick else 50_000, shape=shape)
    row(
        "session clicks",
        f"{len(body) // 1024} KiB of clicks",
        body,
        body,
        old_clicks,
        new_clicks,
        note="before: on the event loop, then every click looped over in the batch thread",
    )
    for name, payload in (
        ("'[' x 100 000", b"[" * 100_000),
        ("'[' x 5 000", b"[" * 5000),
        ("5 000-digit coordinate", b'{"spleen": [[' + b"9" * 5000 + b", 1, 1]]}"),
    ):
        row(f"clicks body {name}", f"{len(payload)} B", payload, payload, old_clicks, new_clicks)
    shear = hi.sheared_sform_nifti()
    row("sheared sform that drops an axis", f"{len(shear)} B", shear, shear, old_full, None)
    return out


def write(results: list[dict], path_json: Path, path_md: Path) -> None:
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "before": BEFORE_COMMIT,
        "after": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }
    path_json.write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    lines = [
        "# Hostile requests: cost before and after (issue 15)",
        "",
        f"Measured by `scripts/bench_hostile.py` on {meta['machine']} (shared, noisy); before = {BEFORE_COMMIT}, after = "
        f"{meta['after']} (+ uncommitted when run). Decoder and parsing in-process: seconds and peak traced allocation "
        "(tracemalloc: Python objects and numpy buffers). Outcome = the HTTP status the route answers.",
        "",
        "| request | size | before | after |",
        "|---|---|---|---|",
    ]

    def cell(m: dict) -> str:
        if "seconds" not in m:
            return f"{m['outcome']}: {m.get('note', '')}"
        return f"{m['outcome']} in {m['seconds']:.3f} s, peak {m['peak_mib']} MiB"

    for r in results:
        lines.append(f"| {r['row']} | {r['size']} | {cell(r['before'])} | {cell(r['after'])} |")
    path_md.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    global OLD
    OLD = old_codecs()
    results = rows(args.quick)
    out = Path(args.out)
    write(results, out / "hostile.json", out / "hostile.md")
    print(f"wrote {out / 'hostile.md'}")


if __name__ == "__main__":
    main()
