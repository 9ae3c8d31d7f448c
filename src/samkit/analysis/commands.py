"""The analysis commands of the ``samkit`` command line: ``hessian``, ``sharpness``,
``landscape`` and ``compare``.

``samkit.cli`` calls :func:`add_analysis_commands` to register them; each ``cmd_*`` function takes
the parsed arguments and returns the exit status. The numbers come from the library functions of
:mod:`samkit.analysis`; this module only loads the run, draws the data subset and writes files.

The data a model is analysed on is a FIXED subset of its training set (``--split test``: the test
set), the same for every command and every run given the same ``--seed``::

    train_ds, eval_ds, _ = build_datasets(config["dataset"], data_dir=..., use_test_set=True,
                                          image_level="none", train_subset=config["train_subset"])
    idx = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed))[:n]
    batches = list(make_loader(train_ds.subset(idx), batch_size, train=False, seed=seed))

i.e. ``n = min(--num-samples, len)`` examples in a seeded random order, with the evaluation
transform (normalisation only, no augmentation), in batches of ``--batch-size``. The loss is the
mean cross-entropy over them with the model in eval mode (BatchNorm running statistics).

Bad input (a missing run directory, a corrupt checkpoint or config, missing data, nonsense flags)
is reported as one line ``samkit COMMAND: error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from samkit.cli import (
    _check_device,
    _HelpFormatter,
    _number,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

__all__ = [
    "CommandError",
    "add_analysis_commands",
    "cmd_compare",
    "cmd_hessian",
    "cmd_landscape",
    "cmd_sharpness",
    "load_model",
    "subset_batches",
]

PROG = "samkit"
DEFAULT_OUTPUT = "analysis"  # under the run directory


class CommandError(Exception):
    """Bad input: printed as ``samkit COMMAND: error: MESSAGE`` (one line), exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------


_at_least_two = _number(int, lambda v: v >= 2, "an integer >= 2")
_finite_float = _number(float, lambda v: True, "a finite number")


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def _add_model_arguments(p: argparse.ArgumentParser, *, output_help: str) -> None:
    p.add_argument(
        "run",
        metavar="RUN_DIR|CHECKPOINT",
        help="a run directory written by samkit train (its newest good checkpoint is used) or "
        "one checkpoint file in it",
    )
    p.add_argument("--output", metavar="DIR", default=None, help=output_help)
    data = p.add_argument_group("data subset")
    data.add_argument(
        "--num-samples",
        metavar="N",
        type=positive_int,
        default=1024,
        help="examples in the fixed random subset (all of them if the split is smaller)",
    )
    data.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=128, help="evaluation batch size"
    )
    data.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="draw the subset from the training set (the loss SAM minimises) or the test set",
    )
    data.add_argument(
        "--seed",
        metavar="SEED",
        type=non_negative_int,
        default=0,
        help="seed of the subset and of the random vectors / directions",
    )
    data.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="data directory (default: the run's config.json data_dir, then the usual places)",
    )
    data.add_argument(
        "--dataset",
        metavar="NAME",
        default=None,
        help="data set name (default: the run's config.json dataset)",
    )
    run = p.add_argument_group("execution")
    run.add_argument("--device", metavar="DEVICE", default="cpu", help="torch device")
    run.add_argument(
        "--threads",
        metavar="N",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice)",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars (default: only on a terminal)",
    )


def _add_hessian_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hessian",
        help="top Hessian eigenvalues (Lanczos), lambda_max/lambda_5, SLQ eigenvalue density",
        description=(
            "Top-k eigenvalues of the Hessian of the training loss on a fixed data subset "
            "(model in eval mode) by Lanczos with full reorthogonalisation on Hessian-vector "
            "products, lambda_max and lambda_max/lambda_5 (Foret et al. 2021, Sec. 4.2); "
            "--method power gives lambda_max alone by power iteration; --density adds the "
            "eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019). "
            "Writes hessian.json (and hessian_density.json / .png)."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_model_arguments(
        p, output_help=f"where to write the files (default: RUN_DIR/{DEFAULT_OUTPUT})"
    )
    h = p.add_argument_group("Hessian")
    h.add_argument(
        "--top-k", metavar="K", type=positive_int, default=5, help="eigenvalues to compute"
    )
    h.add_argument(
        "--method",
        choices=("lanczos", "power"),
        default="lanczos",
        help="lanczos: the top-k eigenvalues; power: lambda_max alone by power iteration",
    )
    h.add_argument(
        "--max-steps",
        metavar="N",
        type=positive_int,
        default=None,
        help="most Lanczos steps for the top-k (default: max(3k, k + 50)) or power iterations "
        "(default: 100); each costs one Hessian-vector product",
    )
    h.add_argument(
        "--tol",
        metavar="TOL",
        type=positive_float,
        default=None,
        help="relative tolerance (default: 1e-6 on the Lanczos residuals, 1e-5 on the change of "
        "the power-iteration estimate)",
    )
    h.add_argument(
        "--density",
        action="store_true",
        help="also estimate the eigenvalue density by stochastic Lanczos quadrature",
    )
    h.add_argument(
        "--probes",
        metavar="N",
        type=positive_int,
        default=10,
        help="SLQ: random Rademacher probe vectors",
    )
    h.add_argument(
        "--lanczos-steps",
        metavar="N",
        type=positive_int,
        default=80,
        help="SLQ: Lanczos steps per probe",
    )
    h.add_argument(
        "--sigma",
        metavar="S",
        type=positive_float,
        default=None,
        help="SLQ: width of the Gaussian kernel (default: 0.2%% of the spectrum's span)",
    )
    p.set_defaults(func=cmd_hessian)


def _add_sharpness_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sharpness",
        help="SAM sharpness max_{||e||<=rho} L(w+e) - L(w) and m-sharpness",
        description=(
            "SAM sharpness max_{||e||_2<=rho} L(w+e) - L(w) on a fixed data subset, by --steps "
            "steps of projected gradient ascent (the first is the SAM step), and m-sharpness "
            "for each --m (Foret et al. 2021, Sec. 4.1): the mean over disjoint chunks of m "
            "examples of each chunk's own sharpness. Writes sharpness.json."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_model_arguments(
        p, output_help=f"where to write the files (default: RUN_DIR/{DEFAULT_OUTPUT})"
    )
    s = p.add_argument_group("sharpness")
    s.add_argument(
        "--rho", metavar="RHO", type=non_negative_float, default=0.05, help="radius of the L2 ball"
    )
    s.add_argument(
        "--steps", metavar="K", type=positive_int, default=1, help="projected ascent steps"
    )
    s.add_argument(
        "--m",
        metavar="M",
        type=positive_int,
        nargs="+",
        default=[],
        help="chunk sizes for m-sharpness, e.g. --m 32 128 (none by default)",
    )
    s.add_argument(
        "--max-chunks",
        metavar="N",
        type=positive_int,
        default=None,
        help="m-sharpness: use at most N chunks per m (default: all N_examples // m)",
    )
    p.set_defaults(func=cmd_sharpness)


def _add_landscape_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "landscape",
        help="1-D / 2-D loss landscapes along filter-normalised directions; line between runs",
        description=(
            "Loss L(w + a d1) (--dims 1) or L(w + a d1 + b d2) (--dims 2) along random "
            "filter-normalised directions (Li et al. 2018), a and b in [-range, range]; with "
            "--other, the loss along the line (1-t) w_a + t w_b between two checkpoints "
            "(Goodfellow et al. 2015; then the random directions only if --dims is given). "
            "Writes PNGs (curve, contour, surface) and the raw arrays (.npz and .json)."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_model_arguments(
        p, output_help=f"where to write the files (default: RUN_DIR/{DEFAULT_OUTPUT})"
    )
    s = p.add_argument_group("landscape")
    s.add_argument(
        "--dims",
        type=int,
        choices=(1, 2),
        default=None,
        help="random directions: 1 (a curve) or 2 (a surface); default 1 without --other, "
        "none with it",
    )
    s.add_argument(
        "--points",
        metavar="N",
        type=_at_least_two,
        default=21,
        help="grid points per axis (and along the line)",
    )
    s.add_argument(
        "--range",
        dest="span",
        metavar="R",
        type=positive_float,
        default=1.0,
        help="the directions' coefficients run over [-R, R]",
    )
    s.add_argument(
        "--include-bias-bn",
        action="store_true",
        help="also perturb biases and BatchNorm weights (default: those get d = 0, as in Li et "
        "al.)",
    )
    s.add_argument(
        "--other",
        metavar="RUN_DIR|CHECKPOINT",
        default=None,
        help="a second checkpoint of the same model: also compute the loss on the line between "
        "the two",
    )
    s.add_argument(
        "--t-range",
        metavar=("T0", "T1"),
        type=_finite_float,
        nargs=2,
        default=(-0.5, 1.5),
        help="the line's parameter t runs over [T0, T1] (t=0: RUN, t=1: --other)",
    )
    p.set_defaults(func=cmd_landscape)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="table and curves (test error, train loss, learning rate) of several runs",
        description=(
            "Compare training runs: print a markdown table (final and best test error, time, "
            "images/s) and, with --output, write it (comparison.md, comparison.json) with PNG "
            "curves of the test error, train loss and learning rate against the epoch. A "
            "directory without metrics.jsonl stands for every run directory below it."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("runs", metavar="RUN_DIR", nargs="+", help="run directories (metrics.jsonl)")
    p.add_argument("--output", metavar="DIR", default=None, help="write the table and curves here")
    p.add_argument(
        "--names",
        metavar="NAME",
        nargs="+",
        default=None,
        help="display names, one per run (default: the shortest unique path suffixes)",
    )
    p.add_argument(
        "--format",
        choices=("markdown", "text"),
        default="markdown",
        help="format of the printed table (the file is always markdown)",
    )
    p.set_defaults(func=cmd_compare)


def add_analysis_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hessian``, ``sharpness``, ``landscape`` and ``compare`` on ``subparsers``
    (the ``samkit`` parser's sub-command action); each sets ``func`` to its ``cmd_*``."""
    _add_hessian_parser(subparsers)
    _add_sharpness_parser(subparsers)
    _add_landscape_parser(subparsers)
    _add_compare_parser(subparsers)


# --------------------------------------------------------------------------------------------
# Shared machinery: errors, threads, loading, data, output
# --------------------------------------------------------------------------------------------


def _one_line(message: Any) -> str:
    """``message`` on one line: its lines joined by ``"; "`` (by a space after a colon)."""
    out = ""
    for part in str(message).splitlines():
        part = part.strip()
        if part:
            out += (" " if out.endswith(":") else "; " if out else "") + part
    return out


def _warn(command: str, message: str) -> None:
    print(f"{PROG} {command}: warning: {_one_line(message)}", file=sys.stderr)


def _run_command(command: str, body: Callable[[], None], threads: int | None = None) -> int:
    """Run ``body``; map :class:`CommandError` (and interrupts) to a one-line message + status."""
    import torch

    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        body()
    except CommandError as exc:
        print(f"{PROG} {command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG} {command}: error: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(before)
    return 0


def _device(name: str) -> Any:
    import torch

    error = _check_device(name)
    if error is not None:
        raise CommandError(error)
    return torch.device(name)


def load_model(path: str, device: Any = "cpu", *, command: str = "", flag: str = "") -> Any:
    """:func:`samkit.train.run.load_run_model` with every failure turned into a
    :class:`CommandError` naming the path (and ``flag``); warnings about skipped corrupt
    checkpoints are printed as one line each."""
    from samkit.train.checkpoint import CheckpointError
    from samkit.train.run import load_run_model

    prefix = f"{flag} " if flag else ""
    p = Path(path)
    if p.name == "checkpoints" and p.is_dir() and not (p / "config.json").exists():
        path = str(p.parent)  # the run's checkpoint directory stands for the run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loaded = load_run_model(path, map_location=device)
        except (FileNotFoundError, CheckpointError) as exc:
            raise CommandError(f"{prefix}{exc}") from None
        except (ValueError, TypeError) as exc:  # corrupt config, unknown model, bad kwargs
            raise CommandError(f"{prefix}{path}: cannot rebuild the model: {exc}") from None
    for w in caught:
        if issubclass(w.category, RuntimeWarning) and "checkpoint" in str(w.message):
            _warn(command, str(w.message))
        else:  # not ours to reword
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    loaded.model.eval()
    return loaded


def subset_batches(
    config: dict[str, Any],
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    data_dir: str | None = None,
    dataset: str | None = None,
    device: Any = None,
) -> tuple[list[tuple[Any, Any]], dict[str, Any]]:
    """The fixed, seeded data subset of the module docstring: ``(batches, description)``.

    ``description`` records the data set, split, size, seed and the chosen ``indices`` (into the
    split, in order). Raises :class:`CommandError` for a missing data set or unreadable files.
    """
    import torch

    from samkit.data import build_datasets, make_loader

    name = dataset or config.get("dataset")
    if not name:
        raise CommandError("the run's config.json names no dataset; pass --dataset")
    root = data_dir or config.get("data_dir")
    train_subset = config.get("train_subset")
    if isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1:
        train_subset = None
    try:
        train_ds, eval_ds, info = build_datasets(
            name,
            data_dir=root,
            use_test_set=True,
            image_level="none",
            train_subset=train_subset if split == "train" else None,
        )
    except (OSError, ValueError) as exc:  # not found, corrupt files, unknown name
        raise CommandError(str(exc)) from None
    ds = train_ds if split == "train" else eval_ds
    n = min(num_samples, len(ds))
    if n == 0:
        raise CommandError(f"the {split} split of {name} is empty")
    indices = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    loader = make_loader(ds.subset(indices), batch_size, train=False, seed=seed, device=device)
    batches = [(x, y) for x, y in loader]
    description = {
        "dataset": name,
        "data_dir": str(root) if root is not None else None,
        "split": split,
        "num_examples": n,
        "split_size": len(ds),
        "batch_size": batch_size,
        "seed": seed,
        "transform": "eval (normalisation only)",
        "indices": indices.tolist(),
    }
    return batches, description


def _check_model_accepts(model: Any, batches: list[tuple[Any, Any]], what: str) -> None:
    """One forward pass on the first batch: a model that cannot take the data (wrong number of
    channels or classes) is bad input, not a crash."""
    import torch

    x, y = batches[0]
    try:
        with torch.no_grad():
            out = model(x[:2])
    except RuntimeError as exc:
        raise CommandError(
            f"{what}: the model cannot process the data ({_one_line(exc)})"
        ) from None
    if out.ndim != 2 or int(y.max()) >= out.shape[1]:
        raise CommandError(
            f"{what}: the model's {tuple(out.shape)[1:]} outputs do not fit labels up to "
            f"{int(y.max())}"
        )


def _output_dir(args: argparse.Namespace, run_dir: Path) -> Path:
    out = Path(args.output) if args.output is not None else run_dir / DEFAULT_OUTPUT
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--output: cannot create {out} ({exc.strerror or exc})") from None
    return out


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become None (strict JSON has no NaN)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _dumps(obj: Any, indent: int = 0) -> str:
    """Indented JSON with every list of plain numbers on one line (a 2-D array: a row a line)."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and obj:
        if all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in obj):
            return json.dumps(obj, allow_nan=False)
        return "[\n" + ",\n".join(inner + _dumps(v, indent + 2) for v in obj) + f"\n{pad}]"
    return json.dumps(obj, allow_nan=False)


def _write_json(path: Path, obj: Any) -> Path:
    path.write_text(_dumps(_jsonable(obj)) + "\n")
    return path


def _source(loaded: Any) -> dict[str, Any]:
    state = loaded.state
    return {
        "run_dir": str(Path(loaded.run_dir).resolve()),
        "checkpoint": str(Path(loaded.checkpoint_path).resolve()),
        "model_name": loaded.config.get("model_name"),
        "step": state.get("step") if isinstance(state.get("step"), int) else None,
        "epoch": state.get("epoch") if isinstance(state.get("epoch"), int) else None,
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("samkit")
    except Exception:
        return "unknown"


@contextlib.contextmanager
def _files_written(written: list[Path]) -> Iterator[list[Path]]:
    """Collect output paths; OSError while writing them is a one-line failure (status 1)."""
    try:
        yield written
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise CommandError(f"cannot write the output ({exc.strerror or exc}){where}", 1) from None


def _report_files(written: Sequence[Path]) -> None:
    for path in written:
        print(f"wrote {path}")


class _Prepared:
    """A loaded run, its data subset, the loss and the output directory."""

    def __init__(self, command: str, args: argparse.Namespace, other: str | None = None):
        import torch.nn as nn

        self.device = _device(args.device)
        self.loaded = load_model(args.run, self.device, command=command)
        self.other = None
        if other is not None:
            self.other = load_model(other, self.device, command=command, flag="--other")
            _check_same_architecture(self.loaded, self.other)
        self.model = self.loaded.model
        self.batches, self.data = subset_batches(
            self.loaded.config,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            seed=args.seed,
            split=args.split,
            data_dir=args.data_dir,
            dataset=args.dataset,
            device=self.device,
        )
        _check_model_accepts(self.model, self.batches, str(self.loaded.checkpoint_path))
        self.loss_fn = nn.CrossEntropyLoss()
        self.out = _output_dir(args, self.loaded.run_dir)
        self.header = {
            "command": command,
            "samkit_version": _version(),
            "source": _source(self.loaded),
            "data": self.data,
            "loss_function": "mean cross-entropy over the subset, model in eval mode",
        }


# --------------------------------------------------------------------------------------------
# samkit hessian
# --------------------------------------------------------------------------------------------


def cmd_hessian(args: argparse.Namespace) -> int:
    """``samkit hessian``: see :func:`_add_hessian_parser`."""
    return _run_command("hessian", lambda: _hessian(args), args.threads)


def _hessian(args: argparse.Namespace) -> None:
    from samkit.analysis.hessian import (
        HessianOperator,
        hessian_top_eigenvalues,
        plot_spectral_density,
        power_iteration_lambda_max,
        slq_density,
    )

    start = time.perf_counter()
    prep = _Prepared("hessian", args)
    dim = sum(p.numel() for p in prep.model.parameters() if p.requires_grad)
    if args.method == "lanczos" and args.top_k > dim:
        raise CommandError(f"--top-k {args.top_k}: the model has only {dim} parameters")
    if args.method == "lanczos" and args.max_steps is not None and args.max_steps < args.top_k:
        raise CommandError(f"--max-steps {args.max_steps} must be >= --top-k {args.top_k}")
    result: dict[str, Any] = {**prep.header, "method": args.method}
    if args.method == "lanczos":
        eig = hessian_top_eigenvalues(
            prep.model,
            prep.loss_fn,
            prep.batches,
            k=args.top_k,
            num_steps=args.max_steps,
            tol=args.tol if args.tol is not None else 1e-6,
            seed=args.seed,
            progress=args.progress,
        )
        result.update(eig.to_dict())
        print(
            f"lambda_max {eig.lambda_max:.6g}, lambda_max/lambda_5 "
            + (
                f"{eig.lambda_max_over_lambda_5:.4g}"
                if eig.lambda_max_over_lambda_5 is not None
                else "n/a"
            )
            + f"; top-{len(eig.eigenvalues)}: "
            + ", ".join(f"{e:.6g}" for e in eig.eigenvalues)
            + f" ({eig.num_lanczos_steps} Lanczos steps, "
            + ("converged" if eig.converged else "not converged to the tolerance")
            + ")"
        )
    else:
        op = HessianOperator(prep.model, prep.loss_fn, prep.batches)
        power = power_iteration_lambda_max(
            op,
            op.dim,
            max_iters=args.max_steps if args.max_steps is not None else 100,
            tol=args.tol if args.tol is not None else 1e-5,
            seed=args.seed,
            progress=args.progress,
        )
        result.update(
            eigenvalues=[power.eigenvalue],
            lambda_max=power.eigenvalue,
            lambda_max_over_lambda_5=None,
            loss=op.loss(),
            num_params=op.dim,
            num_examples=op.num_examples,
            num_hvp=op.num_calls,
            num_power_iterations=power.num_iters,
            converged=power.converged,
        )
        print(
            f"lambda_max {power.eigenvalue:.6g} (power iteration, {power.num_iters} iterations, "
            + ("converged)" if power.converged else "not converged to the tolerance)")
        )
    written: list[Path] = []
    with _files_written(written):
        if args.density:
            op = HessianOperator(prep.model, prep.loss_fn, prep.batches)
            dens = slq_density(
                op,
                op.dim,
                num_probes=args.probes,
                num_steps=args.lanczos_steps,
                sigma=args.sigma,
                seed=args.seed,
                progress=args.progress,
            )
            density = {**prep.header, **dens.to_dict()}
            written.append(_write_json(prep.out / "hessian_density.json", density))
            title = f"Hessian eigenvalue density ({prep.loaded.run_dir.name}, SLQ)"
            written.append(
                plot_spectral_density(dens, prep.out / "hessian_density.png", title=title)
            )
            result["density"] = {
                "json": "hessian_density.json",
                "png": "hessian_density.png",
                "trace_estimate": density["trace_estimate"],
                "num_probes": args.probes,
                "lanczos_steps": args.lanczos_steps,
            }
            print(f"SLQ density: trace(H) ~ {density['trace_estimate']:.6g}")
        result["elapsed_sec"] = time.perf_counter() - start
        written.insert(0, _write_json(prep.out / "hessian.json", result))
    _report_files(written)


# --------------------------------------------------------------------------------------------
# samkit sharpness
# --------------------------------------------------------------------------------------------


def cmd_sharpness(args: argparse.Namespace) -> int:
    """``samkit sharpness``: see :func:`_add_sharpness_parser`."""
    return _run_command("sharpness", lambda: _sharpness(args), args.threads)


def _sharpness(args: argparse.Namespace) -> None:
    from samkit.analysis.sharpness import m_sharpness, sharpness

    start = time.perf_counter()
    prep = _Prepared("sharpness", args)
    n = prep.data["num_examples"]
    too_big = [m for m in args.m if m > n]
    if too_big:
        raise CommandError(f"--m {too_big[0]}: larger than the {n} examples of the subset")
    res = sharpness(prep.model, prep.loss_fn, prep.batches, args.rho, steps=args.steps)
    print(
        f"sharpness (rho {args.rho:g}, {args.steps} step(s)) {res.sharpness:.6g}: "
        f"loss {res.loss:.6g} -> {res.max_loss:.6g}"
    )
    ms = []
    if args.m:
        ms = m_sharpness(
            prep.model,
            prep.loss_fn,
            prep.batches,
            args.m,
            args.rho,
            steps=args.steps,
            max_chunks=args.max_chunks,
            progress=args.progress,
        )
        for r in ms:
            print(f"m-sharpness m={r.m}: {r.sharpness:.6g} +- {r.std:.3g} ({r.num_chunks} chunks)")
    result = {
        **prep.header,
        "rho": args.rho,
        "steps": args.steps,
        "sharpness": res.to_dict(),
        "m_sharpness": [r.to_dict() for r in ms],
        "elapsed_sec": time.perf_counter() - start,
    }
    written: list[Path] = []
    with _files_written(written):
        written.append(_write_json(prep.out / "sharpness.json", result))
    _report_files(written)


# --------------------------------------------------------------------------------------------
# samkit landscape
# --------------------------------------------------------------------------------------------


def cmd_landscape(args: argparse.Namespace) -> int:
    """``samkit landscape``: see :func:`_add_landscape_parser`."""
    return _run_command("landscape", lambda: _landscape(args), args.threads)


def _grid(lo: float, hi: float, points: int) -> Any:
    """``points`` equally spaced values, rounded to 12 decimals so 0 and 1 come out exact."""
    import numpy as np

    return np.round(np.linspace(lo, hi, points), 12) + 0.0  # + 0.0: no -0.0


def _check_same_architecture(a: Any, b: Any) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    diff = sorted(set(sa) ^ set(sb))
    bad = diff or [k for k in sa if sa[k].shape != sb[k].shape]
    if bad:
        raise CommandError(
            f"--other {b.checkpoint_path}: not the same architecture as {a.checkpoint_path} "
            f"(model {b.config.get('model_name')!r} vs {a.config.get('model_name')!r}; "
            f"first differing entry {bad[0]!r})"
        )


def _landscape(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from samkit.analysis.landscape import (
        evaluate_loss,
        filter_normalized_direction,
        interpolation_curve,
        loss_surface_1d,
        loss_surface_2d,
        plot_loss_contour,
        plot_loss_curve,
        plot_loss_surface_3d,
    )

    t0, t1 = args.t_range
    if args.other is not None and not t0 < t1:
        raise CommandError(f"--t-range {t0:g} {t1:g}: T0 must be smaller than T1")
    dims = args.dims if args.dims is not None else (None if args.other is not None else 1)
    start = time.perf_counter()
    prep = _Prepared("landscape", args, other=args.other)
    other = prep.other
    name = prep.loaded.run_dir.name
    model, loss_fn, batches = prep.model, prep.loss_fn, prep.batches
    result: dict[str, Any] = {**prep.header, "loss_at_w": evaluate_loss(model, loss_fn, batches)}
    written: list[Path] = []
    out = prep.out
    with _files_written(written):
        if dims is not None:
            gen = torch.Generator().manual_seed(args.seed)
            alphas = _grid(-args.span, args.span, args.points)
            d1 = filter_normalized_direction(
                model, generator=gen, include_bias_bn=args.include_bias_bn
            )
            common = {
                "directions": "filter-normalised Gaussian (Li et al. 2018), seeded with --seed",
                "include_bias_bn": args.include_bias_bn,
                "seed": args.seed,
                "range": args.span,
                "points": args.points,
            }
            if dims == 1:
                losses = loss_surface_1d(
                    model, loss_fn, batches, d1, alphas, progress=args.progress
                )
                np.savez(out / "landscape_1d.npz", alphas=alphas, losses=losses)
                written.append(out / "landscape_1d.npz")
                written.append(
                    _write_json(
                        out / "landscape_1d.json",
                        {**prep.header, **common, "alphas": alphas, "losses": losses},
                    )
                )
                written.append(
                    plot_loss_curve(
                        alphas,
                        losses,
                        out / "landscape_1d.png",
                        xlabel="alpha (filter-normalised direction)",
                        title=f"loss landscape, 1-D ({name})",
                    )
                )
                result["landscape_1d"] = {"min": float(losses.min()), "max": float(losses.max())}
                print(
                    f"1-D landscape: loss {result['loss_at_w']:.6g} at w, "
                    f"{losses[0]:.6g} / {losses[-1]:.6g} at alpha = -/+{args.span:g}"
                )
            else:
                d2 = filter_normalized_direction(
                    model, generator=gen, include_bias_bn=args.include_bias_bn
                )
                betas = alphas.copy()
                surface = loss_surface_2d(
                    model, loss_fn, batches, d1, d2, alphas, betas, progress=args.progress
                )
                np.savez(out / "landscape_2d.npz", alphas=alphas, betas=betas, surface=surface)
                written.append(out / "landscape_2d.npz")
                written.append(
                    _write_json(
                        out / "landscape_2d.json",
                        {
                            **prep.header,
                            **common,
                            "alphas": alphas,
                            "betas": betas,
                            "surface": surface,
                            "layout": "surface[i][j] = L(w + alphas[j] d1 + betas[i] d2)",
                        },
                    )
                )
                title = f"loss landscape, 2-D ({name})"
                written.append(
                    plot_loss_contour(
                        alphas, betas, surface, out / "landscape_2d_contour.png", title=title
                    )
                )
                written.append(
                    plot_loss_surface_3d(
                        alphas, betas, surface, out / "landscape_2d_surface.png", title=title
                    )
                )
                result["landscape_2d"] = {
                    "min": float(surface.min()),
                    "max": float(surface.max()),
                }
                print(
                    f"2-D landscape: loss {result['loss_at_w']:.6g} at w, "
                    f"from {surface.min():.6g} to {surface.max():.6g} on the grid"
                )
        if other is not None:
            ts = _grid(t0, t1, args.points)
            state_a, state_b = model.state_dict(), other.model.state_dict()
            losses = interpolation_curve(
                model, loss_fn, batches, state_a, state_b, ts, progress=args.progress
            )
            loss_b = evaluate_loss(other.model, loss_fn, batches)
            np.savez(out / "interpolation.npz", ts=ts, losses=losses)
            written.append(out / "interpolation.npz")
            written.append(
                _write_json(
                    out / "interpolation.json",
                    {
                        **prep.header,
                        "other": _source(other),
                        "ts": ts,
                        "losses": losses,
                        "loss_a": result["loss_at_w"],
                        "loss_b": loss_b,
                        "layout": "losses[i] = L((1 - ts[i]) w_a + ts[i] w_b), "
                        "BatchNorm statistics interpolated too",
                    },
                )
            )
            written.append(
                plot_loss_curve(
                    ts,
                    losses,
                    out / "interpolation.png",
                    xlabel="t   ((1 - t) w_a + t w_b)",
                    title=f"linear interpolation: {name} (t=0) -> {other.run_dir.name} (t=1)",
                )
            )
            result["interpolation"] = {
                "other": _source(other),
                "loss_b": loss_b,
                "max_between": float(losses[(ts >= 0) & (ts <= 1)].max(initial=-np.inf)),
            }
            print(
                f"interpolation: loss {result['loss_at_w']:.6g} (t=0) -> {loss_b:.6g} (t=1), "
                f"at most {result['interpolation']['max_between']:.6g} in between"
            )
        result["elapsed_sec"] = time.perf_counter() - start
        written.insert(0, _write_json(out / "landscape.json", result))
    _report_files(written)


# --------------------------------------------------------------------------------------------
# samkit compare
# --------------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    """``samkit compare``: see :func:`_add_compare_parser`."""
    return _run_command("compare", lambda: _compare(args))


def _expand_runs(paths: Sequence[str]) -> list[Path]:
    """Each path as a run directory, or (without ``metrics.jsonl``) every run directory below."""
    from samkit.analysis.compare import METRICS_FILE

    runs: list[Path] = []
    for text in paths:
        path = Path(text)
        if not path.is_dir():
            raise CommandError(f"run directory not found: {path}")
        if (path / METRICS_FILE).is_file():
            runs.append(path)
            continue
        found = sorted(p.parent for p in path.rglob(METRICS_FILE) if p.is_file())
        if not found:
            raise CommandError(f"{path}: no {METRICS_FILE} in this directory or below")
        runs.extend(found)
    unique = list(dict.fromkeys(runs))
    return unique


def _compare(args: argparse.Namespace) -> None:
    from samkit.analysis.compare import RunDirError, compare_runs, comparison_table, load_runs

    runs = _expand_runs(args.runs)
    if args.names is not None and len(args.names) != len(runs):
        raise CommandError(f"--names: {len(args.names)} names for {len(runs)} runs")
    written: list[Path] = []
    try:
        if args.output is None:
            loaded = load_runs(runs, args.names)
            print(comparison_table(loaded, fmt=args.format), end="")
            return
        out = Path(args.output)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--output: cannot create {out} ({exc.strerror or exc})") from None
        with _files_written(written):
            report = compare_runs(runs, out, names=args.names)
            written.append(out / "comparison.md")
            written.append(
                _write_json(
                    out / "comparison.json",
                    {
                        "command": "compare",
                        "samkit_version": _version(),
                        "runs": [str(r) for r in runs],
                        "rows": report.rows,
                        "columns": "error rates as fractions, time in seconds",
                        "plots": {k: v.name for k, v in report.plots.items()},
                    },
                )
            )
            written.extend(report.plots.values())
    except RunDirError as exc:
        raise CommandError(str(exc)) from None
    table = report.table
    if args.format != "markdown":
        table = comparison_table(load_runs(runs, args.names), fmt=args.format)
    print(table, end="")
    _report_files(written)
