"""``samkit sweep``: run a grid of ``samkit train`` settings times seeds (see samkit.sweep)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any

from samkit.cli.args import BoolFlag, CommandError, HelpFormatter, fail, number, parse_bool
from samkit.domains import MAX_THREADS, SEED, THREADS, Interval
from samkit.sweep import SpecError, SweepSpec, load_spec, run_cells, submit_cells, write_manifest
from samkit.sweep.spec import check_spec, directory_name_problem
from samkit.train.config import settings

__all__ = ["add_command", "cmd_sweep"]

DESCRIPTION = """\
Run a sweep: every combination of the spec's variants and grid values, for every seed, each an
ordinary samkit train run directory under OUTPUT/<cell>/seed_<seed>/ (the sweep writes
OUTPUT/sweep.json, which samkit report reads, and the cells' output to OUTPUT/logs/). Running the
same sweep again skips the finished cells and resumes the interrupted ones from their
checkpoints: kill it at any moment.

The spec is a TOML / JSON / YAML file (see docs/sweep.md), or the command line: --set KEY=VALUE
for every cell, --grid KEY=V1,V2 for the values to combine, --seeds. Keys are samkit train's
settings with underscores (num_epochs, sam_rho, label_noise, ...).
"""


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register ``sweep`` on the ``samkit`` parser's sub-commands."""
    p = sub.add_parser(
        "sweep",
        help="run a grid of samkit train settings x seeds (resumable; parallel or on a cluster)",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC", nargs="?", default=None, help="a spec file")
    p.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help="the sweep directory (default: sweeps/NAME)",
    )
    p.add_argument("--name", default=None, help="the sweep's name (default: the spec file's)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="a setting of every cell (repeatable; overrides the spec's base)",
    )
    p.add_argument(
        "--grid",
        metavar="KEY=V1,V2",
        action="append",
        default=[],
        help="values to combine (repeatable; adds to or replaces the spec's grid)",
    )
    p.add_argument(
        "--seeds",
        metavar="SEED",
        type=number(int, SEED),
        nargs="+",
        default=None,
        help="run seeds (default: the spec's, else 0)",
    )
    run = p.add_argument_group("execution")
    run.add_argument(
        "--workers",
        metavar="N",
        type=number(int, THREADS),
        default=None,
        help="cells run at a time on this machine (default: one per CPU core)",
    )
    run.add_argument(
        "--threads",
        metavar="N",
        type=number(int, THREADS),
        default=None,
        help="torch threads per cell (default: the cores split over the workers)",
    )
    run.add_argument(
        "--nproc-per-node",
        metavar="N",
        type=number(int, THREADS),
        default=1,
        help="run each cell as a torchrun job of N processes (DDP)",
    )
    run.add_argument(
        "--train-command",
        metavar="CMD",
        default=None,
        help="what runs samkit for each cell, split on spaces and followed by 'train ...' "
        "(default: this Python's -m samkit; e.g. a wrapper script: 'python wrap.py')",
    )
    run.add_argument(
        "--dry-run",
        action=BoolFlag,
        negatives=("--no-dry-run",),
        default=False,
        help="list the cells and what would run, run nothing",
    )
    cluster = p.add_argument_group("cluster (submitit)")
    cluster.add_argument(
        "--launcher",
        choices=("local", "submitit"),
        default="local",
        help="local: worker processes on this machine; submitit: one job per cell",
    )
    cluster.add_argument(
        "--cluster",
        choices=("auto", "slurm", "local"),
        default="auto",
        help="submitit's executor: slurm, local (jobs as local processes, for testing) or auto",
    )
    cluster.add_argument(
        "--submitit-folder",
        metavar="DIR",
        default=None,
        help="submitit's job files (default: OUTPUT/submitit)",
    )
    cluster.add_argument(
        "--timeout-min",
        metavar="MIN",
        type=number(int, Interval(1, 10**6)),  # about two years
        default=24 * 60,
        help="time limit of each job in minutes",
    )
    cluster.add_argument("--partition", default=None, help="Slurm partition")
    cluster.add_argument(
        "--gpus-per-node",
        metavar="N",
        type=number(int, Interval(0, MAX_THREADS)),
        default=0,
        help="GPUs per job",
    )
    cluster.add_argument(
        "--wait",
        action=BoolFlag,
        negatives=("--no-wait",),
        default=True,
        help="wait for the jobs and report each (--no-wait: submit and return)",
    )
    p.set_defaults(func=cmd_sweep)


_KINDS = {f.name: f.kind for f in settings()}


def _value(key: str, text: str) -> Any:
    """``text`` as the setting's type (so that the manifest holds numbers, not strings)."""
    kind = _KINDS.get(key)
    try:
        if kind is bool:
            return parse_bool(text)
        if kind in (int, float):
            return kind(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise CommandError(f"{key}={text}: not a valid value of {key}") from None
    return text


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"{flag} {item}: expected KEY=VALUE")
        out.append((key.strip().replace("-", "_"), value.strip()))
    return out


def build_spec(args: argparse.Namespace) -> SweepSpec:
    """The spec file (if any) with the command line's --set / --grid / --seeds / --name."""
    if args.spec is not None:
        spec = load_spec(args.spec)
    else:
        spec = SweepSpec(name=args.name or "sweep", seeds=[0])
    for key, text in _pairs(args.set, "--set"):
        spec.base[key] = _value(key, text)
    for key, text in _pairs(args.grid, "--grid"):
        spec.grid[key] = [_value(key, v.strip()) for v in text.split(",") if v.strip()]
    if args.seeds is not None:
        spec.seeds = list(args.seeds)
    if args.name is not None:
        problem = directory_name_problem(args.name)
        if problem:
            raise CommandError(
                f"--name: {problem} ({args.name!r}; the sweep's directory is sweeps/NAME)"
            )
        spec.name = args.name
    if args.set or args.grid or args.seeds is not None:
        check_spec(spec)
    return spec


def cmd_sweep(args: argparse.Namespace) -> int:
    try:
        spec = build_spec(args)
    except (SpecError, CommandError) as exc:
        return fail("sweep", exc)
    out = Path(args.output) if args.output else Path("sweeps") / spec.name
    cells = spec.cells()
    cores = os.cpu_count() or 1
    workers = args.workers or max(1, cores // (args.threads or 1))
    threads = args.threads or max(1, cores // workers)
    if args.dry_run:
        for cell in cells:
            print(f"{cell.run_dir}: {' '.join(f'{k}={v}' for k, v in cell.flags.items())}")
        print(f"{len(cells)} cells in {out}")
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, spec, cells)
    except OSError as exc:
        return fail("sweep", f"--output {out}: {exc.strerror or exc}", code=1)
    train_command = shlex.split(args.train_command) if args.train_command else None
    try:
        if args.launcher == "submitit":
            parameters = {"timeout_min": args.timeout_min}
            if args.partition:
                parameters["slurm_partition"] = args.partition
            if args.gpus_per_node:
                parameters["gpus_per_node"] = args.gpus_per_node
            results = submit_cells(
                out,
                cells,
                cluster=None if args.cluster == "auto" else args.cluster,
                folder=Path(args.submitit_folder or out / "submitit"),
                threads=threads,
                nproc_per_node=args.nproc_per_node,
                train_command=train_command,
                parameters=parameters,
                wait=args.wait,
            )
        else:
            results = run_cells(
                out,
                cells,
                workers=workers,
                threads=threads,
                nproc_per_node=args.nproc_per_node,
                train_command=train_command,
            )
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args else 2
        return fail(
            "sweep",
            "interrupted; the running cells saved a checkpoint: run the same command again "
            "to resume",
            code=128 + int(signum),
        )
    except RuntimeError as exc:  # submitit missing
        return fail("sweep", exc)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"samkit sweep: cell {r.cell.name} seed {r.cell.seed} failed; see {out}/logs/")
    print(f"sweep {spec.name}: {len(results) - len(failed)}/{len(cells)} cells finished in {out}")
    return 1 if failed else 0
