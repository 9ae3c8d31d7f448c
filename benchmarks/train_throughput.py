"""Images per second of ``samkit train``'s loop against bare forward+backward, float32 / amp auto.

Run from the repository root::

    .venv/bin/python benchmarks/train_throughput.py            # about 5 min on 2 idle cores
    .venv/bin/python benchmarks/train_throughput.py --compile  # also torch.compile's cost
    .venv/bin/python benchmarks/train_throughput.py --quick --data-dir DIR   # smoke run

The main job's model (``resnet_small``) and batch (128 Fashion-MNIST images, channels_last as the
loop uses on the CPU), for SGD and SAM, in float32 (``--amp none``) and in what ``--amp auto``
resolves to on this machine:

* ``bare``: a hand loop over one fixed batch already in memory: forward, backward and the
  optimizer step (SAM: forward, backward, ``first_step``, forward, backward, ``second_step``),
  under the same autocast. No data loading, no metrics: the speed limit of the model itself.
* ``loop``: ``samkit.train.train`` with ``--max-steps``, timed by a step hook between the end of
  step ``warmup`` and the end of the last step: data loading, the training step helper (BatchNorm
  policy, RNG replay), the metrics and the checkpoint checks included; start-up and the final
  evaluation excluded.

Each round visits every configuration (bare and loop) in a rotated order, so that a slow spell of
a shared machine does not fall on one of them; the median over rounds is reported, and ratios are
taken within each round (paired) before their median. ``--compile`` adds bare rows with
``torch.compile(model)``: the first step's seconds (compilation) and the steady speed, hence the
number of steps after which compiling pays off. Writes ``benchmarks/results/train_throughput.json``
with the CPU model, its bf16 features, torch's version and the threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import samkit  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from samkit.data import build_datasets
from samkit.models import create_model
from samkit.optim import SAM
from samkit.train.build import amp_for, native_bf16
from samkit.train.config import TrainConfig
from samkit.train.hooks import TrainHooks
from samkit.train.loop import train
from samkit.train.records import cpu_model

MODEL, BATCH = "resnet_small", 128
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def fixed_batch(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    train_ds, _, _ = build_datasets("fashion_mnist", data_dir=data_dir, use_test_set=True)
    x, y = zip(*(train_ds[i] for i in range(BATCH)))
    x = torch.stack(x).contiguous(memory_format=torch.channels_last)
    return x, torch.as_tensor(y)


def bare_images_per_sec(
    optimizer: str, amp: str, batch: tuple[torch.Tensor, torch.Tensor], warmup: int, steps: int,
    compile_model: bool = False,
) -> dict[str, float]:  # fmt: skip
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=10, in_channels=1).to(memory_format=torch.channels_last)
    model.train()
    if compile_model:  # a cold compile every time, as in a fresh run: no cache from a round before
        torch._dynamo.reset()
        torch._inductor.config.force_disable_caches = True
    forward = torch.compile(model) if compile_model else model
    if optimizer == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch
    dtype = AMP_DTYPES[amp]

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return F.cross_entropy(forward(x).float(), y)

    def step() -> None:
        loss().backward()
        if optimizer == "sam":
            opt.first_step(zero_grad=True)
            loss().backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"images_per_sec": BATCH * steps / (time.perf_counter() - t0), "first_step_s": first}


def loop_images_per_sec(
    optimizer: str, amp: str, data_dir: str | None, threads: int, warmup: int, steps: int
) -> float:
    times: dict[int, float] = {}

    def after_step(step: int) -> None:
        times[step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            optimizer=optimizer,
            amp=amp,
            max_steps=warmup + steps,
            data_dir=data_dir,
            run_dir=str(Path(tmp) / "run"),
            tensorboard=False,
            progress=False,
            threads=threads,
        )
        train(cfg, log=lambda msg: None, hooks=TrainHooks(after_step=after_step))
    return BATCH * steps / (times[warmup + steps] - times[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST (default: samkit's search)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (bare)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 + 3 steps")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "train_throughput.json")
    )
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.steps, args.rounds = 2, 3, 1
    torch.set_num_threads(args.threads)
    auto = amp_for(TrainConfig(), torch.device("cpu"), None)
    amps = ["none"] + ([auto] if auto != "none" else [])
    configs = [(opt, amp) for opt in ("sgd", "sam") for amp in amps]
    batch = fixed_batch(args.data_dir)

    samples: dict[str, list[float]] = {}
    compiled: dict[str, list[dict[str, float]]] = {}
    jobs = [(kind, opt, amp) for opt, amp in configs for kind in ("bare", "loop")]
    for r in range(args.rounds):
        for kind, opt, amp in jobs[r % len(jobs) :] + jobs[: r % len(jobs)]:
            if kind == "bare":
                value = bare_images_per_sec(opt, amp, batch, args.warmup, args.steps)
                value = value["images_per_sec"]
            else:
                value = loop_images_per_sec(
                    opt, amp, args.data_dir, args.threads, args.warmup, args.steps
                )
            samples.setdefault(f"{kind}/{opt}/{amp}", []).append(value)
            print(f"round {r + 1}: {kind:4} {opt:3} amp={amp:4} {value:8.0f} img/s", flush=True)
    # after every eager round: inductor's compile workers stay behind as processes
    for _ in range(args.rounds if args.compile else 0):
        for amp in amps:
            row = bare_images_per_sec("sgd", amp, batch, args.warmup, args.steps, True)
            compiled.setdefault(f"compiled/sgd/{amp}", []).append(row)
            print(f"compiled: sgd amp={amp:4} {row['images_per_sec']:8.0f} img/s", flush=True)

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b]))

    rows = []
    print(f"\n{'optimizer':9} {'amp':5} {'bare img/s':>11} {'loop img/s':>11} {'loop/bare':>10}")
    for opt, amp in configs:
        bare, loop = f"bare/{opt}/{amp}", f"loop/{opt}/{amp}"
        row = {
            "optimizer": opt,
            "amp": amp,
            "bare_images_per_sec": statistics.median(samples[bare]),
            "loop_images_per_sec": statistics.median(samples[loop]),
            "loop_over_bare": paired(loop, bare),
        }
        if amp != "none":
            row["bare_over_float32"] = paired(bare, f"bare/{opt}/none")
            row["loop_over_float32"] = paired(loop, f"loop/{opt}/none")
        rows.append(row)
        print(
            f"{opt:9} {amp:5} {row['bare_images_per_sec']:11.0f} {row['loop_images_per_sec']:11.0f}"
            f" {row['loop_over_bare']:10.2f}"
            + (f"   {amp} / float32: loop {row['loop_over_float32']:.2f}x" if amp != "none" else "")
        )
    compile_rows = []
    for key, runs in compiled.items():
        amp = key.split("/")[-1]
        eager = statistics.median(samples[f"bare/sgd/{amp}"])
        speed = statistics.median(r["images_per_sec"] for r in runs)
        first = statistics.median(r["first_step_s"] for r in runs)
        gain = 1 / eager - 1 / speed  # seconds saved per image once compiled
        breakeven = first / (gain * BATCH) if gain > 0 else None
        compile_rows.append(
            {
                "amp": amp,
                "first_step_s": first,
                "images_per_sec": speed,
                "over_eager": speed / eager,
                "breakeven_steps": breakeven,
            }  # fmt: skip
        )
        print(
            f"torch.compile sgd amp={amp}: first step {first:.1f} s, {speed:.0f} img/s "
            f"({speed / eager:.2f}x eager), pays off after "
            + (f"{breakeven:.0f} steps" if breakeven else "never")
        )
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    result = {
        "machine": {
            "cpu_model": cpu_model(),
            "avx512_bf16": " avx512_bf16" in flags,
            "amx_tile": " amx_tile" in flags,
            "native_bf16": native_bf16(torch.device("cpu")),
            "amp_auto_resolves_to": auto,
            "torch": torch.__version__,
            "threads": args.threads,
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
        },
        "settings": {
            "model": MODEL,
            "batch": BATCH,
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
        },
        "rows": rows,
        "compile": compile_rows,
        "samples": samples,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
