"""What ``samkit hessian`` costs: seconds per Hessian-vector product (HVP) against seconds per
forward+backward pass on the main job's model, and the wall time of ``samkit hessian RUN`` with
its defaults.

Run from the repository root::

    .venv/bin/python benchmarks/analysis_cost.py                 # trains a 1-epoch run first
    .venv/bin/python benchmarks/analysis_cost.py --run RUN_DIR   # an existing run directory
    .venv/bin/python benchmarks/analysis_cost.py --quick         # smoke run: a tiny model

The model is a run of ``samkit train`` with its defaults (``resnet_small`` on Fashion-MNIST, the
main job), trained for one epoch unless ``--run`` names one. The data are what ``samkit hessian``
uses by default: 1,024 training images (seed 0), evaluation transform, model in eval mode, in one
batch (``--batch-size``, default 1024, the command's default) and, for the rows ending in
``_b128``, in batches of 128 (``--small-batch``; the command's default before). Variants, each a
pass over all the images:

* ``fwd_bwd``: the gradient of the mean loss (one forward+backward pass per batch): the unit.
* ``hvp``: one HVP as ``samkit hessian`` computes it now, the operator's first-order graphs kept
  from its first call (``HessianOperator``'s default).
* ``hvp_first``: that first call (it builds the graphs, then the product), timed once per round on
  a fresh operator.
* ``hvp_rebuilt``: the previous implementation (``graph_memory=0``): forward, backward with
  ``create_graph`` and the backward of ``<g, v>`` at every product. Same numbers bit for bit.
* ``hvp_fwd_over_rev``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` with
  ``functional_call`` (the same products to float32 round-off).
* ``fwd_bwd_b128``, ``hvp_b128``, ``hvp_rebuilt_b128``: the same in batches of 128;
  ``hvp_rebuilt_b128`` is what one product of ``samkit hessian`` cost before (its ratio is to
  ``fwd_bwd_b128``, as every ``_b128`` row's).

Timing: one untimed call of each, then rounds, each running every variant once in an order
rotated by one per round. Each sample records its wall time, this process's CPU time (all
threads) and the share of its threads' time (wall x threads) they spent waiting for a CPU (Linux
schedstat ``run_delay``). On a shared 2-core machine another busy process makes multi-threaded
kernels stall at every OpenMP barrier: samples 5-20x slower than quiet ones, whatever is being
measured. So a sample is *quiet* when that wait share is below ``--quiet-threshold`` (5%), and
after ``--rounds`` rounds more run, up to ``--budget`` seconds, until every variant has 3 quiet
samples. Statistics use the quiet samples when every variant has 3 (JSON ``basis``: "quiet"),
else all samples, with a WARNING. Reported: medians, and the ratio to the forward+backward pass
from the medians and paired (median over the rounds, quiet in both when the basis is "quiet", of
the per-round ratios). The target of issue 14: s per HVP / s per forward+backward <= 2.5, from
the medians.

Then ``samkit hessian RUN`` itself, with its defaults, in a subprocess (stderr is a pipe, so its
progress comes as lines, kept in the JSON): wall time from start to exit (interpreter start and
imports included), the command's own ``elapsed_sec``, and the Lanczos steps it took.

Output: a table, and ``benchmarks/results/analysis_cost.json`` (``--output``) with the machine
(``lscpu`` model name, cores, torch version and threads, load average), the date, every sample.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
try:
    import samkit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(SRC))

from samkit.analysis import HessianOperator  # noqa: E402
from samkit.analysis.subset import subset_batches  # noqa: E402
from samkit.models import create_model  # noqa: E402
from samkit.rundir import load_run_model, save_checkpoint  # noqa: E402

TARGET_RATIO = 2.5  # issue 14: s per HVP / s per forward+backward
QUIET_THRESHOLD = 0.05  # a quiet sample: its threads waited for a CPU < 5% of their time
MIN_QUIET = 3  # fewer quiet samples than this for any variant: statistics over all samples
TASKS_DIR = Path("/proc/self/task")
VARIANTS = {
    "fwd_bwd": "gradient over the subset (1 forward+backward per batch)",
    "hvp": "HVP, first-order graphs kept (samkit hessian now)",
    "hvp_first": "first HVP of a fresh operator (builds the graphs)",
    "hvp_rebuilt": "HVP, graphs rebuilt every product (before)",
    "hvp_fwd_over_rev": "HVP by torch.func.jvp of torch.func.grad",
    "fwd_bwd_b128": "fwd_bwd in batches of 128",
    "hvp_b128": "hvp in batches of 128",
    "hvp_rebuilt_b128": "hvp_rebuilt in batches of 128 (samkit hessian before)",
}


def wait_us() -> float | None:
    """Microseconds this process's threads have waited for a CPU so far (schedstat run_delay)."""
    total = 0
    try:
        for task in TASKS_DIR.iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except FileNotFoundError:  # the thread exited meanwhile
                continue
    except (OSError, IndexError, ValueError):
        return None
    return total / 1e3


def sample(fn: Callable[[], Any]) -> dict[str, float | None]:
    """Wall and CPU seconds of ``fn()``, and the share of its threads' time (wall x torch
    threads) they spent waiting for a CPU."""
    w0, c0, t0 = wait_us(), time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    w1 = wait_us()
    threads = torch.get_num_threads()
    waited = None if w0 is None or w1 is None else (w1 - w0) / 1e6 / (wall * threads)
    return {"wall_s": wall, "cpu_s": cpu, "wait_fraction": waited}


def train_run(run_dir: Path, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "samkit", "train", "--run-dir", str(run_dir)]
    cmd += ["--no-tensorboard", "--no-progress", "--num-epochs", "1"]
    if threads:
        cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
    return ["samkit", *cmd[3:]]


def untrained_run(run_dir: Path) -> list[str]:
    """--quick: a run directory as samkit train writes it, with an untrained resnet_tiny."""
    torch.manual_seed(0)
    model = create_model("resnet_tiny", num_classes=10, in_channels=1)
    config = {"model_name": "resnet_tiny", "num_classes": 10, "in_channels": 1}
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**config, "dataset": "fashion_mnist"}))
    save_checkpoint({"model": model.state_dict(), "step": 0}, run_dir / "checkpoints", 0)
    return ["untrained resnet_tiny (--quick)"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def forward_over_reverse(model: nn.Module, loss_fn: Any, batches: list, weights: list[float]):
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    sizes = [p.numel() for p in params.values()]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        tangents = {
            n: t.view_as(params[n]) for n, t in zip(params, torch.split(v.to(torch.float32), sizes))
        }
        out = None
        for (x, y), w in zip(batches, weights):

            def loss_of(ps: dict[str, torch.Tensor], x=x, y=y, w=w) -> torch.Tensor:
                return loss_fn(functional_call(model, (ps, buffers), (x,)), y) * w

            _, hv = jvp(grad(loss_of), (params,), (tangents,))
            flat = torch.cat([hv[n].reshape(-1) for n in params])
            out = flat if out is None else out + flat
        assert out is not None
        return out

    return hvp


def time_variants(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    loaded = load_run_model(str(run_dir))
    model = loaded.model.eval()
    loss_fn = nn.CrossEntropyLoss()

    def batches_of(size: int) -> list:
        b, _ = subset_batches(loaded.config, num_samples=args.num_samples, batch_size=size, seed=0)
        return b

    batches = batches_of(args.batch_size)
    op = HessianOperator(model, loss_fn, batches)
    rebuilt = HessianOperator(model, loss_fn, batches, graph_memory=0)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fwd_rev = forward_over_reverse(model, loss_fn, op.batches, op.weights)
    variants: dict[str, Callable[[], Any]] = {
        "fwd_bwd": op.gradient,
        "hvp": lambda: op(v),
        "hvp_first": lambda: HessianOperator(model, loss_fn, batches)(v),
        "hvp_rebuilt": lambda: rebuilt(v),
        "hvp_fwd_over_rev": lambda: fwd_rev(v),
    }
    small = None
    if args.small_batch and args.small_batch != args.batch_size:
        small_batches = batches_of(args.small_batch)
        small = HessianOperator(model, loss_fn, small_batches)
        small_rebuilt = HessianOperator(model, loss_fn, small_batches, graph_memory=0)
        variants["fwd_bwd_b128"] = small.gradient
        variants["hvp_b128"] = lambda: small(v)
        variants["hvp_rebuilt_b128"] = lambda: small_rebuilt(v)
    # Correctness on this model: kept = rebuilt exactly; forward-over-reverse to round-off.
    hv = op(v)
    agree = {
        "hvp_equals_hvp_rebuilt_bitwise": bool(torch.equal(hv, rebuilt(v))),
        "hvp_fwd_over_rev_max_abs_diff_over_max_abs": float(
            (fwd_rev(v).double() - hv).abs().max() / hv.abs().max()
        ),
        "kept_graph_bytes": op.kept_bytes,
        "kept_batches": op.num_kept,
        "batches": len(op.batches),
    }
    if small is not None:
        hs = small(v)
        agree["hvp_b128_max_abs_diff_over_max_abs"] = float((hs - hv).abs().max() / hv.abs().max())
        agree["kept_graph_bytes_b128"] = small.kept_bytes
    for fn in variants.values():  # warm-up
        fn()
    names = list(variants)
    samples: dict[str, list[dict[str, float | None]]] = {n: [] for n in names}
    start, r = time.perf_counter(), 0
    while r < args.rounds or (
        time.perf_counter() - start < args.budget
        and any(len(quiet(ss, args.quiet_threshold)) < MIN_QUIET for ss in samples.values())
    ):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples[name].append(sample(variants[name]))
        r += 1
        fewest = min(len(quiet(ss, args.quiet_threshold)) for ss in samples.values())
        print(f"  round {r} done ({fewest}+ quiet samples each)", file=sys.stderr, flush=True)
    config = loaded.config
    return {
        "model_name": config.get("model_name"),
        "run": {k: config.get(k) for k in ("dataset", "optimizer", "sam_rho", "num_epochs")}
        | {"step": loaded.state.get("step")},
        "num_params": op.dim,
        "num_examples": op.num_examples,
        "checkpoint": str(loaded.checkpoint_path),
        "agreement": agree,
        "samples": samples,
    }


def quiet(ss: list[dict[str, Any]], threshold: float) -> list[int]:
    """Indices of the quiet samples (unknown wait: counted quiet)."""
    return [
        i for i, s in enumerate(ss) if s["wait_fraction"] is None or s["wait_fraction"] < threshold
    ]


def summarise(timing: dict[str, Any], threshold: float) -> dict[str, Any]:
    samples = timing["samples"]
    use_quiet = all(len(quiet(ss, threshold)) >= MIN_QUIET for ss in samples.values())
    keep = {
        n: quiet(ss, threshold) if use_quiet else list(range(len(ss))) for n, ss in samples.items()
    }

    def median(name: str, key: str) -> float:
        return statistics.median(samples[name][i][key] for i in keep[name])

    rows = {}
    for name, ss in samples.items():
        wall, cpu = median(name, "wall_s"), median(name, "cpu_s")
        waits = [s["wait_fraction"] for s in ss if s["wait_fraction"] is not None]
        base = "fwd_bwd_b128" if name.endswith("_b128") else "fwd_bwd"
        unit, unit_cpu = median(base, "wall_s"), median(base, "cpu_s")
        both = [i for i in keep[name] if i in keep[base]] or list(range(len(ss)))
        paired = statistics.median(ss[i]["wall_s"] / samples[base][i]["wall_s"] for i in both)
        rows[name] = {
            "what": VARIANTS[name],
            "median_wall_s": wall,
            "median_cpu_s": cpu,
            "x_fwd_bwd": wall / unit,
            "x_fwd_bwd_paired": paired,
            "x_fwd_bwd_cpu": cpu / unit_cpu,
            "median_wait_fraction": statistics.median(waits) if waits else None,
            "samples_used": len(keep[name]),
            "samples_taken": len(ss),
        }
    ratio = rows["hvp"]["x_fwd_bwd"]
    return {
        "basis": "quiet" if use_quiet else "all",
        "quiet_threshold": threshold,
        "rows": rows,
        "target": {
            "name": "s per HVP / s per forward+backward (medians)",
            "value": ratio,
            "paired": rows["hvp"]["x_fwd_bwd_paired"],
            "cpu": rows["hvp"]["x_fwd_bwd_cpu"],
            "limit": TARGET_RATIO,
            "met": ratio <= TARGET_RATIO,
        },
    }


def default_run(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """``samkit hessian RUN`` with its defaults (plus --output; --threads if given)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "samkit", "hessian", str(run_dir), "--output", out]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += args.hessian_args
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"samkit hessian failed: {done.stderr[-2000:]}")
        result = json.loads((Path(out) / "hessian.json").read_text())
    keys = ("num_hvp", "num_lanczos_steps", "converged", "lambda_max", "eigenvalues", "batch_sizes")
    return {
        "command": ["samkit", *cmd[3:4], "RUN", *cmd[5:6], "DIR", *cmd[7:]],
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "elapsed_sec": result["elapsed_sec"],
        **{k: result[k] for k in keys},
        "stderr_lines": done.stderr.splitlines(),
        "stdout": done.stdout.splitlines(),
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        git = ["git", "-C", str(ROOT)]
        info["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        info["src_dirty"] = bool(
            subprocess.run(
                [*git, "status", "--porcelain", "src"], capture_output=True, text=True
            ).stdout.strip()
        )
    except OSError:
        pass
    return info


def print_table(timing: dict[str, Any], summary: dict[str, Any], threads: int) -> None:
    basis = (
        "statistics over quiet samples"
        if summary["basis"] == "quiet"
        else "WARNING: too few quiet samples (a busy machine), statistics over all samples"
    )
    print(
        f"{timing['model_name']} ({timing['num_params']:,} parameters), "
        f"{timing['num_examples']:,} examples, {threads} thread(s); {basis}"
    )
    head = f"{'variant':<18}{'wall s':>9}{'cpu s':>9}{'x fwd+bwd':>11}{'paired':>8}"
    print(head + f"{'cpu x':>7}{'wait':>7}{'quiet/all':>10}  what")
    for name, r in summary["rows"].items():
        wait = r["median_wait_fraction"]
        used = f"{r['samples_used']}/{r['samples_taken']}"
        print(
            f"{name:<18}{r['median_wall_s']:>9.3f}{r['median_cpu_s']:>9.3f}"
            f"{r['x_fwd_bwd']:>11.2f}{r['x_fwd_bwd_paired']:>8.2f}{r['x_fwd_bwd_cpu']:>7.2f}"
            f"{'' if wait is None else f'{100 * wait:.0f}%':>7}{used:>10}  {r['what']}"
        )
    t = summary["target"]
    print(
        f"target: {t['name']} <= {t['limit']}: {t['value']:.2f} (paired {t['paired']:.2f}, "
        f"cpu {t['cpu']:.2f}): {'PASS' if t['met'] else 'FAIL'}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="run directory (default: train a 1-epoch one)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    p.add_argument("--rounds", type=int, default=5, help="timing rounds, at least (default 5)")
    p.add_argument(
        "--budget",
        type=float,
        default=900.0,
        help="seconds of timing after which no new round starts to collect quiet samples "
        "(default 900)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=QUIET_THRESHOLD,
        help="most share of a sample's thread time spent waiting for a CPU for it to count as "
        "quiet (default %(default)s)",
    )
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1024, help="samkit hessian's default")
    p.add_argument(
        "--small-batch", type=int, default=128, help="batch of the _b128 rows (0: skip them)"
    )
    p.add_argument("--no-default-run", action="store_true", help="skip samkit hessian RUN")
    p.add_argument(
        "--hessian-args", nargs=argparse.REMAINDER, default=[], help="extra samkit hessian flags"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: an untrained resnet_tiny, 64 examples"
    )
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/analysis_cost.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.num_samples, args.batch_size, args.small_batch = 1, 64, 64, 32
        args.budget = 0.0
        quick = ["--num-samples", "64", "--top-k", "2", "--max-steps", "3"]
        args.hessian_args = [*quick, *args.hessian_args]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "samkit hessian: s per HVP / s per forward+backward, default run time",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": list(os.getloadavg()),
        "config": {
            k: getattr(args, k)
            for k in (
                "run",
                "threads",
                "rounds",
                "num_samples",
                "batch_size",
                "small_batch",
                "quick",
            )
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run) if args.run else Path(tmp) / "run"
        if not args.run:
            print("training a run of samkit train's main job ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            cmd = untrained_run(run_dir) if args.quick else train_run(run_dir, args.threads)
            result["training"] = {"command": cmd, "wall_s": time.perf_counter() - t0}
        timing = time_variants(args, run_dir)
        summary = summarise(timing, args.quiet_threshold)
        result.update(timing=timing, summary=summary)
        print_table(timing, summary, threads)
        if not args.no_default_run:
            print("samkit hessian RUN with its defaults ...", file=sys.stderr, flush=True)
            d = default_run(args, run_dir)
            result["default_run"] = d
            print(
                f"samkit hessian RUN (defaults): {d['wall_s']:.1f} s wall from start to exit "
                f"({d['elapsed_sec']:.1f} s in the command, {d['cpu_s']:.1f} s CPU), "
                f"{d['num_hvp']} HVPs, {'converged' if d['converged'] else 'not converged'}, "
                f"lambda_max {d['lambda_max']:.6g}"
            )
    result["load_average_end"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - started
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
