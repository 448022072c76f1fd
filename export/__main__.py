"""``python -m export``: build the default repository, or export a user's model.

    python -m export build [--repository DIR] [--checkpoints DIR] [--models a,b] [--skip-existing]
    python -m export onnx --model pkg.module:factory --input-shape 3,32,32 --name NAME
                          [--checkpoint FILE] [--repository DIR] [--opset 18] [--replace] ...
    python -m export onnx --model path/to/net.py:factory --name NAME
                          --input ids:INT64:16:0..999 --input mask:BOOL:16 ...
    python -m export behavior [--out DIR] [--checkpoints DIR] [--docs-plot]
    python -m export quantize --model NAME [--name NEW_NAME] [--max-accuracy-drop 0.5]
    python -m export tune --model NAME [--threads N] [--rounds 5] [--dry-run]

Errors the user can fix are printed as one ``error:`` line (exit status 2), not a traceback.
Installed, the same commands are ``normserve export ...`` (see export_cli).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# First of ours: it imports our models/service packages before a same-named package of the
# current directory can shadow them (see export/cli_imports.py).
from export import cli_imports
from export.axes import DYNAMIC_AXIS_SYNTAX, parse_dynamic_axis
from export.behavior_report import CURVE_EPOCHS, CURVE_SEEDS, DEFAULT_OUT, DOCS_PLOT, run_behavior
from export.build import DEFAULT_CHECKPOINTS, DEFAULT_REPOSITORY, build_repository
from export.checkpoint import CheckpointError
from export.cli_inputs import INPUT_HELP, parse_input, parse_shape
from export.cli_onnx import run_onnx
from export.fold import FoldError
from export.publish import DEFAULT_MAX_BATCH
from export.quantize import DEFAULT_MAX_DROP_POINTS, quantize_published
from export.to_onnx import DEFAULT_OPSET, ExportError
from export.tune import tune
from service.errors import RepositoryError

USER_ERRORS = (
    ExportError,
    FoldError,
    CheckpointError,
    RepositoryError,
    cli_imports.UserModelError,
    ValueError,
    ImportError,
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m export") -> int:
    parser = _parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # what a new user types first: the commands, not argparse's complaint
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser(prog: str) -> argparse.ArgumentParser:
    # The module docstring is reStructuredText; help is plain text: no ``quotes``.
    summary, _, rest = __doc__.replace("``", "").partition("\n\n")
    examples = rest.partition("\n\n")[0].replace("python -m export", prog)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=summary.replace("python -m export: b", "B"),
        epilog=f"examples:\n{examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    build = sub.add_parser("build", help="train (if needed) and export the default models")
    build.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    build.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    build.add_argument("--models", type=_names, default=None, help="comma-separated subset")
    build.add_argument(
        "--skip-existing", action="store_true", help="leave models already in the repository"
    )
    build.set_defaults(run=_build)

    onnx = sub.add_parser("onnx", help="export your own model into the repository")
    onnx.add_argument(
        "--model",
        required=True,
        help="pkg.module:factory (found from the current directory) or path/to/file.py:factory "
        "(its folder first on the path), returning an nn.Module",
    )
    onnx.add_argument("--checkpoint", type=Path, help=".safetensors, or a .pt/.pth state_dict")
    shapes = onnx.add_mutually_exclusive_group(required=True)
    shapes.add_argument(
        "--input-shape", type=parse_shape, help="one FP32 input's per-sample shape, e.g. 3,32,32"
    )
    shapes.add_argument("--input", action="append", type=parse_input, help=INPUT_HELP)
    onnx.add_argument(
        "--dynamic-axis",
        action="append",
        type=parse_dynamic_axis,
        default=[],
        help=f"{DYNAMIC_AXIS_SYNTAX}: axis AXIS of input NAME (0 is the batch axis) takes any "
        "size from 1 to MAX, e.g. input:1:64 for a sequence's length: served as -1, capped "
        "at MAX in config.json; the example's size there is the shape's",
    )
    onnx.add_argument("--name", required=True, help="model name in the repository")
    onnx.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    onnx.add_argument("--input-name", help="with --input-shape (default: input)")
    onnx.add_argument(
        "--output-name",
        help="comma-separated, one per output (default: output, output_0,..., or a dict's keys)",
    )
    onnx.add_argument("--labels", help="comma-separated, or @FILE with one a line")
    onnx.add_argument("--description", default="")
    onnx.add_argument("--version", type=int, help="default: the next free version")
    onnx.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH)
    onnx.add_argument(
        "--replace",
        action="store_true",
        help="replace a same-named model with other inputs/outputs (its versions are dropped)",
    )
    onnx.set_defaults(run=run_onnx)

    behavior = sub.add_parser(
        "behavior", help="measure BatchNorm/LayerNorm in training and inference: the report"
    )
    behavior.add_argument("--out", type=Path, default=DEFAULT_OUT)
    behavior.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    behavior.add_argument(
        "--docs-plot", action="store_true", help=f"also rewrite the tracked {DOCS_PLOT}"
    )
    behavior.add_argument(
        "--seeds", type=int, default=CURVE_SEEDS, help="seeds per variant, training curves"
    )
    behavior.add_argument(
        "--epochs", type=int, default=CURVE_EPOCHS, help="epochs per run, training curves"
    )
    behavior.set_defaults(run=_behavior)

    quantize = sub.add_parser(
        "quantize", help="publish an int8 copy of a digits model, if it keeps its accuracy"
    )
    quantize.add_argument("--model", required=True, help="fp32 model in the repository")
    quantize.add_argument("--name", help="name of the int8 model (default: MODEL_int8)")
    quantize.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    quantize.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=DEFAULT_MAX_DROP_POINTS,
        help="refuse if test accuracy falls by more points than this",
    )
    quantize.set_defaults(run=_quantize)

    tuning = sub.add_parser(
        "tune", help="time each engine and optimization level on a model; record the fastest"
    )
    tuning.add_argument("--model", required=True, help="model in the repository")
    tuning.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    tuning.add_argument("--threads", type=int, help="intra-op threads (default: this CPU budget)")
    tuning.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    tuning.add_argument("--dry-run", action="store_true", help="measure, do not write config")
    tuning.set_defaults(run=_tune)
    return parser


def _build(args: argparse.Namespace) -> int:
    build_repository(
        args.repository, args.checkpoints, args.models, skip_existing=args.skip_existing
    )
    print(f"model repository ready: {args.repository}")
    return 0


def _behavior(args: argparse.Namespace) -> int:
    if args.seeds < 1 or args.epochs < 1:
        raise ValueError("--seeds and --epochs must be at least 1")
    run_behavior(
        args.out,
        args.checkpoints,
        docs_plot=DOCS_PLOT if args.docs_plot else None,
        seeds=args.seeds,
        epochs=args.epochs,
    )
    print(f"behaviour report: {args.out / 'report.md'}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    config, report = quantize_published(
        args.repository, args.model, new_name=args.name, max_drop_points=args.max_accuracy_drop
    )
    print(report.summary())
    print(f"{args.repository / config.name} version {config.latest.version}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    if args.rounds < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError("--rounds and --threads must be at least 1")
    result = tune(
        args.repository,
        args.model,
        threads=args.threads,
        rounds=args.rounds,
        write=not args.dry_run,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(result.table())
    if not args.dry_run:
        print(f"recorded in {args.repository / args.model / 'config.json'}")
    return 0


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


if __name__ == "__main__":
    sys.exit(main())
