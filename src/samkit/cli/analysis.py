"""``samkit hessian`` and ``samkit sharpness``, and what every command that analyses a trained
model shares (:mod:`samkit.cli.landscape` uses it too): loading the run, drawing the data subset,
writing the results.

Each ``cmd_*`` function takes the parsed arguments and returns the exit status. The numbers come
from the library functions of :mod:`samkit.analysis`; this module only loads the run, draws the
data subset and writes files (JSON through :func:`samkit.rundir.write_json`).

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
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from samkit._version import samkit_version
from samkit.analysis.hessian import (
    HessianOperator,
    hessian_top_eigenvalues,
    plot_spectral_density,
    power_iteration_lambda_max,
    slq_density,
)
from samkit.analysis.sharpness import m_sharpness, sharpness
from samkit.analysis.subset import check_model_accepts, subset_batches
from samkit.cli.args import (
    BoolFlag,
    CommandError,
    HelpFormatter,
    check_device,
    fail,
    number,
    warn,
)
from samkit.cli.limits import check_hessian_memory
from samkit.domains import BATCH, COUNT, POSITIVE_SCALE, SCALE, SEED, THREADS, Interval
from samkit.rundir import ANALYSIS_DIR, CheckpointError, load_run_model, write_json
from samkit.rundir.layout import HESSIAN_FILE

__all__ = ["add_commands", "cmd_hessian", "cmd_sharpness", "load_model"]

# Every number is bounded (samkit.domains): a huge value is refused here, before any work.
positive_int = number(int, COUNT)  # examples, chunks
positive_float = number(float, POSITIVE_SCALE)
non_negative_float = number(float, SCALE)
seed_int = number(int, SEED)
batch_int = number(int, BATCH)
threads_int = number(int, THREADS)
top_k_int = number(int, Interval(1, 1000))
iterations = number(int, Interval(1, 10_000))  # Lanczos / power / ascent steps, probes


def add_model_arguments(p: argparse.ArgumentParser, *, output_help: str) -> None:
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
        "--batch-size", metavar="N", type=batch_int, default=128, help="evaluation batch size"
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
        type=seed_int,
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
        type=threads_int,
        default=None,
        help="CPU threads for torch (default: torch's choice)",
    )
    run.add_argument(
        "--progress",
        action=BoolFlag,
        negatives=("--no-progress",),
        default=None,
        help="progress on stderr: a bar on a terminal, otherwise a line with an ETA every 10 s "
        "or so (default: on; --no-progress: none)",
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
            "Writes hessian.json (and hessian_density.json / .png).\n\n"
            "Cost with the defaults: at most 55 Hessian-vector products over 1,024 examples; "
            "Lanczos stops once the top-5 meet --tol (after 17 on a 1-epoch model of samkit "
            "train's main job). A product costs about 2.1 forward+backward passes over the "
            "examples (the first about 3.2: it builds the graph the others reuse), so at most "
            "about 115 passes (about 37 for that model; benchmarks/README.md); --density "
            "adds --probes x --lanczos-steps = 800 products. Without --batch-size the products "
            "run in as few batches as 2 GiB of kept graphs allow (one for the main job's model): "
            "fewer, larger operations, much faster on a busy machine."
        ),
        formatter_class=HelpFormatter,
    )
    add_model_arguments(
        p, output_help=f"where to write the files (default: RUN_DIR/{ANALYSIS_DIR})"
    )
    p.set_defaults(batch_size=None)  # the description says what None does
    h = p.add_argument_group("Hessian")
    h.add_argument("--top-k", metavar="K", type=top_k_int, default=5, help="eigenvalues to compute")
    h.add_argument(
        "--method",
        choices=("lanczos", "power"),
        default="lanczos",
        help="lanczos: the top-k eigenvalues; power: lambda_max alone by power iteration",
    )
    h.add_argument(
        "--max-steps",
        metavar="N",
        type=iterations,
        default=None,
        help="most Lanczos steps for the top-k (default: max(3k, k + 50)) or power iterations "
        "(default: 100); each costs one Hessian-vector product",
    )
    h.add_argument(
        "--tol",
        metavar="TOL",
        type=number(float, Interval(0, 1, low_open=True, high_open=True)),
        default=None,
        help="relative tolerance (default: 1e-6 on the Lanczos residuals, 1e-5 on the change of "
        "the power-iteration estimate)",
    )
    h.add_argument(
        "--density",
        action=BoolFlag,
        negatives=("--no-density",),
        default=False,
        help="also estimate the eigenvalue density by stochastic Lanczos quadrature",
    )
    h.add_argument(
        "--probes",
        metavar="N",
        type=iterations,
        default=10,
        help="SLQ: random Rademacher probe vectors",
    )
    h.add_argument(
        "--lanczos-steps",
        metavar="N",
        type=iterations,
        default=80,
        help="SLQ: Lanczos steps per probe",
    )
    h.add_argument(
        "--sigma",
        metavar="S",
        type=number(float, Interval(0, 1e6, low_open=True)),  # in eigenvalue units
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
        formatter_class=HelpFormatter,
    )
    add_model_arguments(
        p, output_help=f"where to write the files (default: RUN_DIR/{ANALYSIS_DIR})"
    )
    s = p.add_argument_group("sharpness")
    s.add_argument(
        "--rho", metavar="RHO", type=non_negative_float, default=0.05, help="radius of the L2 ball"
    )
    s.add_argument(
        "--steps", metavar="K", type=iterations, default=1, help="projected ascent steps"
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


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hessian`` and ``sharpness`` on the ``samkit`` parser's sub-commands."""
    _add_hessian_parser(subparsers)
    _add_sharpness_parser(subparsers)


# --------------------------------------------------------------------------------------------
# Shared machinery: errors, threads, loading, data, output
# --------------------------------------------------------------------------------------------


def run_command(command: str, body: Callable[[], None], threads: int | None = None) -> int:
    """Run ``body``; map :class:`CommandError` (and interrupts) to a one-line message + status."""
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        body()
    except CommandError as exc:
        return fail(command, exc, exc.code)
    except KeyboardInterrupt:
        return fail(command, "interrupted", 130)
    finally:
        torch.set_num_threads(before)
    return 0


def _device(name: str) -> torch.device:
    error = check_device(name)
    if error is not None:
        raise CommandError(error)
    return torch.device(name)


def load_model(path: str, device: Any = "cpu", *, command: str = "", flag: str = "") -> Any:
    """:func:`samkit.rundir.load_run_model` with every failure turned into a
    :class:`CommandError` naming the path (and ``flag``); warnings about skipped corrupt
    checkpoints are printed as one line each."""
    prefix = f"{flag} " if flag else ""
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
            warn(command, str(w.message))
        else:  # not ours to reword
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    loaded.model.eval()
    return loaded


def _output_dir(args: argparse.Namespace, run_dir: Path) -> Path:
    out = Path(args.output) if args.output is not None else run_dir / ANALYSIS_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--output: cannot create {out} ({exc.strerror or exc})") from None
    return out


def write_results(path: Path, obj: Any) -> Path:
    return write_json(path, obj, arrays=True)


def source(loaded: Any) -> dict[str, Any]:
    state = loaded.state
    return {
        "run_dir": str(Path(loaded.run_dir).resolve()),
        "checkpoint": str(Path(loaded.checkpoint_path).resolve()),
        "model_name": loaded.config.get("model_name"),
        "step": state.get("step") if isinstance(state.get("step"), int) else None,
        "epoch": state.get("epoch") if isinstance(state.get("epoch"), int) else None,
    }


@contextlib.contextmanager
def files_written(written: list[Path]) -> Iterator[list[Path]]:
    """Collect output paths; OSError while writing them is a one-line failure (status 1)."""
    try:
        yield written
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise CommandError(f"cannot write the output ({exc.strerror or exc}){where}", 1) from None


def report_files(written: Sequence[Path]) -> None:
    for path in written:
        print(f"wrote {path}")


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


class Prepared:
    """A loaded run, its data subset, the loss and the output directory."""

    def __init__(self, command: str, args: argparse.Namespace, other: str | None = None):
        self.device = _device(args.device)
        self.loaded = load_model(args.run, self.device, command=command)
        self.other = None
        if other is not None:
            self.other = load_model(other, self.device, command=command, flag="--other")
            _check_same_architecture(self.loaded, self.other)
        self.model = self.loaded.model
        try:
            self.batches, self.data = subset_batches(
                self.loaded.config,
                num_samples=args.num_samples,
                batch_size=args.batch_size or args.num_samples,  # hessian: re-cut by HVPs
                seed=args.seed,
                split=args.split,
                data_dir=args.data_dir,
                dataset=args.dataset,
                device=self.device,
            )
            check_model_accepts(self.model, self.batches, str(self.loaded.checkpoint_path))
        except (OSError, ValueError) as exc:  # not found, corrupt files, unknown name, misfit
            raise CommandError(str(exc)) from None
        self.loss_fn = nn.CrossEntropyLoss()
        self.out = _output_dir(args, self.loaded.run_dir)
        self.header = {
            "command": command,
            "samkit_version": samkit_version(),
            "source": source(self.loaded),
            "data": self.data,
            "loss_function": "mean cross-entropy over the subset, model in eval mode",
        }


# --------------------------------------------------------------------------------------------
# samkit hessian
# --------------------------------------------------------------------------------------------


def cmd_hessian(args: argparse.Namespace) -> int:
    """``samkit hessian``: see :func:`_add_hessian_parser`."""
    return run_command("hessian", lambda: _hessian(args), args.threads)


def _hessian(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    prep = Prepared("hessian", args)
    dim = sum(p.numel() for p in prep.model.parameters() if p.requires_grad)
    if args.method == "lanczos" and args.top_k > dim:
        raise CommandError(f"--top-k {args.top_k}: the model has only {dim} parameters")
    if args.method == "lanczos" and args.max_steps is not None and args.max_steps < args.top_k:
        raise CommandError(f"--max-steps {args.max_steps} must be >= --top-k {args.top_k}")
    check_hessian_memory(args, dim, prep.device)
    hvp_batches = "auto" if args.batch_size is None else None  # None: --batch-size as given
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
            batch_size=hvp_batches,
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
        op = HessianOperator(prep.model, prep.loss_fn, prep.batches, batch_size=hvp_batches)
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
            batch_sizes=op.batch_sizes,
        )
        print(
            f"lambda_max {power.eigenvalue:.6g} (power iteration, {power.num_iters} iterations, "
            + ("converged)" if power.converged else "not converged to the tolerance)")
        )
    written: list[Path] = []
    with files_written(written):
        if args.density:
            op = HessianOperator(prep.model, prep.loss_fn, prep.batches, batch_size=hvp_batches)
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
            written.append(write_results(prep.out / "hessian_density.json", density))
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
        written.insert(0, write_results(prep.out / HESSIAN_FILE, result))
    report_files(written)


# --------------------------------------------------------------------------------------------
# samkit sharpness
# --------------------------------------------------------------------------------------------


def cmd_sharpness(args: argparse.Namespace) -> int:
    """``samkit sharpness``: see :func:`_add_sharpness_parser`."""
    return run_command("sharpness", lambda: _sharpness(args), args.threads)


def _sharpness(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    prep = Prepared("sharpness", args)
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
    with files_written(written):
        written.append(write_results(prep.out / "sharpness.json", result))
    report_files(written)
