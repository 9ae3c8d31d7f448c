"""The ``samkit`` command line.

``samkit train`` trains a small ResNet on Fashion-MNIST with SAM (see
:mod:`samkit.train.loop`). Heavy imports (torch) happen only when a command runs, so
``samkit --help`` is instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]

PROG = "samkit"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``samkit train: error: ...``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless the default is None or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def _number(kind: type, check: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "a non-negative number")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("samkit")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def _add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from samkit.train.config import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a model on Fashion-MNIST with SAM (the default main job)",
        description=(
            "Train a small ResNet on Fashion-MNIST with SAM (base: SGD with Nesterov "
            "momentum, cosine learning-rate schedule per step) and evaluate on the test set "
            "after every epoch. Writes metrics.jsonl, summary.json and TensorBoard scalars to "
            "OUTPUT_DIR/lr_{lr}/wd_{wd}/rho_{rho}/seed_{seed}/."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--epochs", metavar="N", type=positive_int, default=d.epochs, help="training epochs"
    )
    p.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=d.batch_size, help="batch size"
    )
    p.add_argument(
        "--learning-rate",
        metavar="LR",
        type=positive_float,
        default=d.learning_rate,
        help="peak learning rate",
    )
    p.add_argument(
        "--weight-decay",
        metavar="WD",
        type=non_negative_float,
        default=d.weight_decay,
        help="L2 weight decay (in the base SGD)",
    )
    p.add_argument(
        "--sam-rho",
        metavar="RHO",
        type=non_negative_float,
        default=d.sam_rho,
        help="SAM neighbourhood size rho; 0 trains with plain SGD",
    )
    p.add_argument("--model", metavar="NAME", default=d.model, help="model name from the registry")
    p.add_argument(
        "--augment",
        choices=("none", "basic"),
        default="basic" if d.augment else "none",
        help="image augmentation: basic = random flip + 2px reflect-pad random crop",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="directory holding the four Fashion-MNIST IDX files (searched without it: "
        "$SAMKIT_DATA, ~/.cache/samkit/fashion_mnist, /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--output-dir", metavar="DIR", default=d.output_dir, help="where runs are written"
    )
    p.add_argument(
        "--device", metavar="DEVICE", default=d.device, help="torch device, e.g. cpu or cuda:0"
    )
    p.add_argument(
        "--train-subset",
        type=positive_int,
        default=None,
        metavar="N",
        help="train on the first N training images only",
    )
    p.add_argument(
        "--run-seed",
        metavar="SEED",
        type=non_negative_int,
        default=d.run_seed,
        help="seed of the model initialisation and the data order",
    )
    p.add_argument(
        "--threads",
        metavar="N",
        type=positive_int,
        default=None,
        help="CPU threads for torch (torch's choice, one per core, when not given); on a machine "
        "shared with other busy processes --threads 1 avoids a steep slowdown",
    )
    p.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=d.tensorboard,
        help="write TensorBoard scalars",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: only on a terminal)",
    )
    p.set_defaults(func=_cmd_train)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="samkit: sharpness-aware minimization (SAM) for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    from samkit.analysis.commands import add_analysis_commands

    add_analysis_commands(sub)  # hessian, sharpness, landscape, compare
    return parser


def _fail(command: str, message: str, code: int = 2) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return code


def _check_device(name: str) -> str | None:
    """An error message if ``name`` is not a usable torch device, else None."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device: {name!r} is not a torch device (try cpu or cuda)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: CUDA is not available on this machine"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS is not available on this machine"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"--device {name}: unsupported device type {device.type!r}"
    return None


def _cmd_train(args: argparse.Namespace) -> int:
    from samkit.data import DataNotFoundError, IDXFormatError
    from samkit.models import is_model, list_models
    from samkit.train.config import TrainConfig
    from samkit.train.loop import TrainingDivergedError, train

    if not is_model(args.model):
        return _fail(
            "train", f"--model: unknown model {args.model!r}; known: {', '.join(list_models())}"
        )
    problem = _check_device(args.device)
    if problem:
        return _fail("train", problem)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        sam_rho=args.sam_rho,
        model=args.model,
        augment=args.augment == "basic",
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        device=args.device,
        train_subset=args.train_subset,
        run_seed=args.run_seed,
        threads=args.threads,
        tensorboard=args.tensorboard,
        progress=args.progress,
    )
    try:
        train(cfg)
    except (DataNotFoundError, IDXFormatError) as e:
        return _fail("train", str(e))
    except TrainingDivergedError as e:
        return _fail("train", str(e), code=1)
    except OSError as e:  # e.g. an output directory that cannot be written
        return _fail("train", f"{e.strerror or e}: {e.filename}" if e.filename else str(e), 1)
    except KeyboardInterrupt:
        return _fail("train", "interrupted", code=130)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samkit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
