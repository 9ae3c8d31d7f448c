"""Training throughput (images/s) of SGD and SAM with 1 and 2 processes (DDP, gloo, CPU).

Every configuration runs ``SharpnessAwareStep`` (the step ``samkit train`` uses) on ``resnet_tiny``
with a fixed synthetic Fashion-MNIST-sized batch (28x28x1, 10 classes; data loading is not
measured). The GLOBAL batch is the same in every configuration (``--batch-size``, default 128);
with 2 processes each one takes half of it, wrapped in DistributedDataParallel, and SAM perturbs
per process (m = per-process batch, the ``samkit train`` default under torchrun).

Configurations: 1 process x 1 thread, 1 process x 2 threads (the fair single-process baseline on
a 2-core machine), 2 processes x 1 thread. Workers are this script run with ``--worker``; the
parent bounds each configuration with a timeout.

    .venv/bin/python benchmarks/ddp_scaling.py             # about 1.5 minutes on 2 cores
    .venv/bin/python benchmarks/ddp_scaling.py --steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CONFIGS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(SRC))
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from samkit.models import create_model
    from samkit.optim import SAM
    from samkit.train import SharpnessAwareStep
    from samkit.train.distributed import exit_without_teardown

    torch.set_num_threads(args.threads)
    world, rank = args.world, args.rank
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{args.port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
    torch.manual_seed(0)
    model = create_model("resnet_tiny", num_classes=10, in_channels=1)
    model = model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    if args.optimizer == "sam":
        opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    step_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    step = SharpnessAwareStep(
        step_model, opt, lambda out, y: F.cross_entropy(out, y, reduction="none")
    )
    local = args.batch_size // world
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(local, 1, 28, 28, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (local,), generator=gen)
    for _ in range(args.warmup):
        step(x, y)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        print(json.dumps({"seconds": seconds}), flush=True)
    if world > 1:
        # Not destroy_process_group(): gloo's C++ teardown races with the other rank's exit and
        # can abort a finished worker (SIGABRT); leave after the barrier above, like samkit train.
        exit_without_teardown()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world: int, threads: int, optimizer: str, args: argparse.Namespace) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo")
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--rank",
                str(r),
                "--world",
                str(world),
                "--port",
                str(port),
                "--threads",
                str(threads),
                "--optimizer",
                optimizer,
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=args.timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"worker failed ({world} x {threads}, {optimizer}):\n{out}")
    seconds = json.loads(outs[0].strip().splitlines()[-1])["seconds"]
    return args.batch_size * args.steps / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--optimizer", default="sgd", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=40, help="timed steps per round")
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds per configuration; the best is kept"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per configuration")
    p.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parent / "results" / "ddp_scaling.json"),
    )
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    load = os.getloadavg()[0]
    rows = []
    for optimizer in ("sgd", "sam"):
        for world, threads in CONFIGS:
            ips = max(run_config(world, threads, optimizer, args) for _ in range(args.repeats))
            rows.append(
                {"optimizer": optimizer, "processes": world, "threads_per_process": threads,
                 "images_per_sec": round(ips, 1)}
            )  # fmt: skip
            print(f"  {optimizer} {world} x {threads}: {ips:.0f} img/s", file=sys.stderr)
    base = {r["optimizer"]: r["images_per_sec"] for r in rows if r["processes"] == 1
            and r["threads_per_process"] == 1}  # fmt: skip
    print(
        f"\nresnet_tiny, global batch {args.batch_size}, best of {args.repeats} x {args.steps} "
        "timed steps, CPU"
    )
    print(f"{'optimizer':<10}{'processes':>10}{'threads':>9}{'images/s':>11}{'vs 1x1':>9}")
    for r in rows:
        r["speedup_vs_1_process_1_thread"] = round(r["images_per_sec"] / base[r["optimizer"]], 2)
        print(
            f"{r['optimizer']:<10}{r['processes']:>10}{r['threads_per_process']:>9}"
            f"{r['images_per_sec']:>11.0f}{r['speedup_vs_1_process_1_thread']:>8.2f}x"
        )
    import torch

    result = {
        "benchmark": "ddp_scaling",
        "model": "resnet_tiny",
        "input": "28x28x1, 10 classes, synthetic",
        "global_batch": args.batch_size,
        "timed_steps": args.steps,
        "repeats_best_of": args.repeats,
        "load_average_before": round(load, 2),
        "warmup_steps": args.warmup,
        "backend": "gloo",
        "sam": "rho 0.05, per-process perturbation (m = per-process batch)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
