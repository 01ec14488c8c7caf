"""`spleen-deepedit annotate`: the subcommand's arguments and its one-line summary."""

from __future__ import annotations

from .job import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, FORMATS, AnnotateConfig
from .pipeline import annotate


def cmd_annotate(args) -> int:
    """`spleen-deepedit annotate`: run the job and print a one-line summary."""
    cfg = AnnotateConfig(
        input=args.input,
        output=args.output,
        checkpoint=args.checkpoint,
        format=args.format,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        num_gpus=args.num_gpus,
        read_concurrency=args.read_concurrency,
        num_cpus=args.num_cpus,
        profile=args.profile,
        redo=args.redo,
    )
    result = annotate(cfg)
    ok, failed = result.count("ok", resumed=False), result.count("failed")
    print(
        f"annotated {len(result.rows)} case(s) in {result.seconds:.1f}s with {result.model_version}: {ok} ok, "
        f"{result.count('ok', resumed=True)} finished earlier, {failed} failed; manifest {result.manifest[0]}"
    )
    for row in result.rows:
        if row["status"] == "failed":
            print(f"  failed {row['case_id']} ({row['stage']}): {row['error']}")
    return 0


def add_parser(sub) -> None:
    """The `annotate` subcommand (argparse only; Ray loads when it runs)."""
    from ..cli import _positive_int as positive  # the CLI's one check (cli imports this module lazily)
    from ..config import PROFILES

    p = sub.add_parser("annotate", help="pre-annotate a cohort (NIfTI files, DICOM series) on Ray Data; resumable")
    p.add_argument(
        "--input", required=True, help="folder or s3:// prefix: .nii/.nii.gz files, DICOM series folders, .zip series"
    )
    p.add_argument(
        "--output", required=True, help="folder or s3:// prefix: masks/, rows/, manifest.parquet, manifest.csv"
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint URI: local path or s3://")
    p.add_argument(
        "--format", choices=FORMATS, default="nii.gz", help="mask format: nii.gz, or dcm (DICOM SEG; DICOM inputs)"
    )
    p.add_argument("--batch-size", type=positive, default=DEFAULT_BATCH_SIZE, help="volumes per forward pass")
    p.add_argument("--concurrency", type=positive, default=DEFAULT_CONCURRENCY, help="forward actors")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per forward actor (0: CPU)")
    p.add_argument("--read-concurrency", type=positive, default=None, help="most read/preprocess/write tasks at once")
    p.add_argument("--num-cpus", type=positive, default=None, help="CPUs of the local Ray (without RAY_ADDRESS)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="override the checkpoint's profile")
    p.add_argument("--redo", action="store_true", help="annotate every case again, even those finished with this model")
    p.set_defaults(func=cmd_annotate)
