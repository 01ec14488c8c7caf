"""`spleen-deepedit` command line. Each subcommand parses its arguments and calls one plain function.

User errors (bad paths, values, data, checkpoints, clicks) end with a one-line `error: ...` message
naming the value and exit status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from .config import (
    DEFAULT_VAL_FRACTION,
    EVAL_SPLITS,
    PROFILES,
    ConfigError,
    EvaluateConfig,
    check_click_radius,
    field_default,
)
from .errors import SpleenDeepEditError

EXIT_USER_ERROR = 2


#: What ends a command with a one-line message and EXIT_USER_ERROR; anything else is a bug (traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (SpleenDeepEditError, FileNotFoundError, NotADirectoryError)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _radius(text: str) -> float:
    try:
        return check_click_radius(float(text))
    except ValueError:  # not a number, or ConfigError (a ValueError) naming the value
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number >= 0 (grid voxels; 0 turns click locality off)"
        ) from None


REFINE_HELP = (
    "answer clicks with a click-centred window at a fine spacing (default: when the checkpoint was "
    "trained with windows; --no-refine: the whole-scan pass with click locality)"
)
CLICK_RADIUS_HELP = (
    "click locality radius in network-grid voxels: a click changes the mask only near itself "
    "(default: the profile's, 2 for cpu; 0 = off, the model zoo's behaviour)"
)


def _check_device(name: str | None) -> None:
    """Reject a --device this machine cannot use before any work starts."""
    if not name:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: no CUDA device is available here; use --device cpu")


def _profiles_help() -> str:
    return "; ".join(f"{p.name}: {p.description}" for p in PROFILES.values())


# ----------------------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import write_dataset

    t0 = time.perf_counter()
    shape = tuple(args.shape) if args.shape else None
    meta = write_dataset(
        args.out, args.cases, seed=args.seed, test_cases=args.test_cases, shape=shape, geometry=args.geometry
    )
    series = ""
    if args.dicom:
        from .dicom import write_dicom_dataset

        series = (
            f", and {len(write_dicom_dataset(args.out, args.dicom))} DICOM series ({args.dicom}) in {args.out}/dicom"
        )
    print(
        f"wrote {meta['numTraining']} labelled + {meta['numTest']} test phantoms to {args.out}{series} "
        f"in {time.perf_counter() - t0:.1f}s (seed {args.seed})"
    )
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data import check_dataset

    ds = check_dataset(args.data)
    train, val = ds.split(args.val_fraction) if len(ds.labelled) >= 2 else (ds.labelled, [])
    print(
        f"{ds.root}: OK — {len(ds.labelled)} labelled cases ({len(train)} train / {len(val)} validation), {len(ds.test)} test images"
    )
    return 0


def build_train_config(args: argparse.Namespace):
    """Profile defaults < YAML file < command-line flags."""
    from .config import TrainConfig, load_yaml_config

    cfg = load_yaml_config(args.config) if args.config else TrainConfig()
    return cfg.replace(
        profile=args.profile,
        epochs=args.epochs,
        resume=True if args.resume else None,
        init_from=args.init_from,
        max_train_seconds=args.max_train_seconds,
        seed=args.seed,
        val_fraction=args.val_fraction,
        learning_rate=args.learning_rate,
        amp=False if args.no_amp else None,
        deterministic=True if args.deterministic else None,
    )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = build_train_config(args)
    from .data import list_dataset

    if not (args.ray and args.data.startswith("s3://")):  # an s3:// dataset is checked by the Ray job
        list_dataset(args.data)  # fail fast on a missing or malformed dataset
    prof = cfg.profile_spec
    print(f"profile {prof.name}: {prof.description}; {cfg.num_epochs} epochs; output {args.output}", flush=True)
    if args.ray:
        from .ray_job import RayJobConfig, run_ray_training  # lazy: Ray is an optional dependency

        job = RayJobConfig.for_output(
            args.output,
            storage=args.storage,
            run_name=args.run_name,
            num_workers=args.num_workers,
            use_gpu=bool(args.use_gpu),
        )
        run_ray_training(cfg, args.data, args.output, job)
        return 0
    import torch

    from .runtime import LocalRuntime
    from .train import train

    device = torch.device(args.device) if args.device else None
    metrics = train(cfg, args.data, LocalRuntime(args.output, device))
    print(json.dumps({k: metrics.get(k) for k in ("epoch", "loss", "train_dice", "val_dice", "best_val_dice")}))
    return 0


def load_clicks(value: str | None) -> Any:
    """`--clicks` value: inline JSON or the path of a JSON file."""
    from pathlib import Path

    from .clicks import ClickError

    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise ClickError(f"--clicks {value!r} is neither inline JSON nor an existing JSON file")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClickError(f"--clicks is not valid JSON ({exc.msg} at char {exc.pos})") from None


def cmd_infer(args: argparse.Namespace) -> int:
    import torch

    from .clicks import validate_clicks
    from .data import load_volume, write_mask
    from .dicom import is_dicom_source  # pydicom itself loads only for a DICOM input
    from .predictor import Predictor

    clicks = load_clicks(args.clicks)
    fmt = args.format or ("dcm" if str(args.output).lower().endswith(".dcm") else "nii.gz")
    series = None
    if is_dicom_source(args.image):
        from .dicom import read_series

        image, affine, series = read_series(args.image)
    else:
        image, affine = load_volume(args.image)
    if fmt == "dcm" and series is None:
        raise ConfigError(
            f"--format dcm writes a DICOM SEG that references its source series, but --image {args.image!r} "
            "is not a DICOM series: pass a series folder or .zip, or use --format nii.gz"
        )
    validate_clicks(clicks, tuple(image.shape))  # before loading the model: fail fast
    device = torch.device(args.device) if args.device else None
    predictor = Predictor.from_checkpoint(
        args.checkpoint, profile=args.profile, device=device, click_radius=args.click_radius, refine=args.refine
    )
    t0 = time.perf_counter()
    pred = predictor.predict(image, affine, clicks)
    if fmt == "dcm" and series is not None:  # a dcm request without a series was refused above
        from .dicom import SegInfo, write_seg

        write_seg(args.output, pred.mask, series, SegInfo(model_version=predictor.version))
    else:
        write_mask(args.output, pred.mask, pred.affine)
    n_clicks = sum(len(v) for v in (clicks or {}).values())
    print(
        f"wrote {args.output}: {int(pred.mask.sum())} spleen voxels, shape {list(pred.mask.shape)}, "
        f"{n_clicks} click(s), {time.perf_counter() - t0:.2f}s"
    )
    return 0


def evaluate_config(args: argparse.Namespace) -> EvaluateConfig:
    """`evaluate` flags -> the typed settings of `trainer.evaluate.evaluate_checkpoint`."""
    return EvaluateConfig(
        checkpoint=args.checkpoint,
        data_dir=args.data,
        output_dir=args.output,
        split=args.split,
        max_clicks=args.max_clicks,
        profile=args.profile,
        device=args.device,
        metrics_log=args.metrics_log,
        click_radius=args.click_radius,
        refine=args.refine,
        dicom=args.dicom,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`spleen-deepedit evaluate`: run `evaluate_checkpoint` with the parsed arguments."""
    from .evaluate import evaluate_checkpoint

    evaluate_checkpoint(evaluate_config(args))
    print(f"report written to {args.output}", flush=True)
    return 0


# ----------------------------------------------------------------------------- parser


def _add_synth(sub: Any) -> None:
    p = sub.add_parser("synth", help="write a synthetic Decathlon-layout spleen dataset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cases", required=True, type=_positive_int, help="number of labelled cases")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument(
        "--test-cases", type=int, default=None, help="unlabelled test images (default: cases // 4, at least 1)"
    )
    p.add_argument(
        "--shape", type=_positive_int, nargs=3, metavar=("X", "Y", "Z"), help="fixed voxel grid (default: varied)"
    )
    p.add_argument(
        "--geometry",
        choices=("compact", "clinical"),
        default="compact",
        help="compact: 80-128 voxels in-plane, 36-64 slices around the spleen (fast); clinical: "
        "0.6-1.0 mm in-plane, 1.25-5 mm slices, 300-500 mm from the lung bases to the pelvis "
        "(~10 s and ~100 MB per case)",
    )
    p.add_argument(
        "--dicom",
        nargs="?",
        const="uncompressed",
        default=None,
        choices=("uncompressed", "jpeg2000", "jpegls", "rle"),
        help="also write every image as a DICOM CT series under OUT/dicom/ (optionally compressed)",
    )
    p.set_defaults(func=cmd_synth)


def _add_check_data(sub: Any) -> None:
    p = sub.add_parser("check-data", help="check a Decathlon dataset's integrity before training")
    p.add_argument("--data", required=True, help="dataset directory (dataset.json or imagesTr/labelsTr)")
    p.add_argument(
        "--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="validation fraction shown in the summary"
    )
    p.set_defaults(func=cmd_check_data)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train DeepEdit (single process, or Ray Train with --ray)")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--output", required=True, help="output directory: checkpoints/, metrics.jsonl, config.yaml")
    p.add_argument(
        "--profile", choices=sorted(PROFILES), default=None, help=f"network profile (default cpu). {_profiles_help()}"
    )
    p.add_argument("--epochs", type=_positive_int, default=None, help="epochs (default: the profile's)")
    p.add_argument("--config", default=None, help="YAML file of training settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this checkpoint (ours or a bundle model.pt): path, file:// or s3://",
    )
    p.add_argument(
        "--max-train-seconds",
        type=float,
        default=None,
        help="wall-time budget in seconds: stop at the first step past it (validate, checkpoint); the cosine schedule anneals over it",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision")
    p.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels (GPU runs repeat exactly; slower)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g = p.add_argument_group("Ray Train (with --ray; see docs/ray.md)")
    g.add_argument(
        "--ray", action="store_true", help="run as a Ray Train job (local Ray cluster unless RAY_ADDRESS is set)"
    )
    g.add_argument("--num-workers", type=_positive_int, default=None, help="Ray Train workers (DDP ranks)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    g.add_argument("--storage", default=None, help="checkpoint storage: local path or s3://bucket/prefix")
    g.add_argument("--run-name", default=None, help="stable run name: resubmitting with it resumes")
    p.set_defaults(func=cmd_train)


def _add_infer(sub: Any) -> None:
    p = sub.add_parser("infer", help="segment one CT volume (NIfTI or DICOM series), optionally with clicks")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint (ours, or a bundle model.pt): path, file:// or s3://"
    )
    p.add_argument(
        "--image",
        required=True,
        help="input .nii/.nii.gz, or a DICOM CT series: a folder or a .zip (see docs/dicom.md)",
    )
    p.add_argument(
        "--clicks",
        default=None,
        help='JSON or JSON file: {"spleen": [[i,j,k]], "background": [[i,j,k]]} (original voxel indices)',
    )
    p.add_argument(
        "--output",
        required=True,
        help="output mask: .nii.gz (uint8, original geometry) or, with --format dcm, a DICOM SEG file",
    )
    p.add_argument(
        "--format",
        choices=("nii.gz", "dcm"),
        default=None,
        help="mask format (default: dcm if --output ends in .dcm, else nii.gz); dcm needs a DICOM --image",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="override the checkpoint's profile")
    p.add_argument("--click-radius", type=_radius, default=None, help=CLICK_RADIUS_HELP)
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None, help=REFINE_HELP)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_infer)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="Dice versus number of simulated clicks on a dataset split")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint (ours, or a bundle model.pt): path, file:// or s3://"
    )
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--output", required=True, help="report directory: per_case.csv, summary.json, PNG plots")
    p.add_argument(
        "--max-clicks",
        type=int,
        default=field_default(EvaluateConfig, "max_clicks"),
        help="simulated corrective clicks after the automatic pass (default: %(default)s)",
    )
    p.add_argument(
        "--split",
        choices=EVAL_SPLITS,
        default=field_default(EvaluateConfig, "split"),
        help="which cases to evaluate (default: %(default)s; val: the split the checkpoint was trained with)",
    )
    p.add_argument(
        "--metrics-log", default=None, help="training metrics.jsonl to plot (default: next to the checkpoint)"
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="override the checkpoint's profile")
    p.add_argument("--click-radius", type=_radius, default=None, help=CLICK_RADIUS_HELP)
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None, help=REFINE_HELP)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--dicom",
        action="store_true",
        help="read each image from its DICOM series, DATA/dicom/<imagesTr|imagesTs>/<case>/ (as `synth --dicom` writes it)",
    )
    p.set_defaults(func=cmd_evaluate)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve on a local Ray (see docs/serving.md)")
    p.add_argument("--checkpoint", required=True, help="checkpoint URI: local path, file:// or s3://")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--click-radius", type=_radius, default=None, help=CLICK_RADIUS_HELP)
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None, help=REFINE_HELP)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--token-file", default=None, help="file holding the bearer token (32+ characters), re-read when it changes"
    )
    p.add_argument("--token-env", default=None, help="environment variable holding the bearer token (32+ characters)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a bearer token")
    p.set_defaults(func=_lazy("trainer.serve.cli", "cmd_serve"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spleen-deepedit", description="DeepEdit spleen segmentation: data, training, inference."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(sub)
    _add_check_data(sub)
    _add_train(sub)
    _add_infer(sub)
    _add_evaluate(sub)
    _add_serve(sub)

    from .annotate import add_parser as add_annotate_parser  # argparse only; Ray loads when it runs

    add_annotate_parser(sub)

    from k8s.cli import (
        add_parser as add_k8s_parser,  # argparse only; the kubernetes client loads when a k8s command runs
    )

    add_k8s_parser(sub)
    return parser


def _lazy(module: str, name: str):
    """A command handler imported only when the command runs (keeps `--help` fast, Ray optional)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).__dict__[name](args)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        _check_device(getattr(args, "device", None))
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
