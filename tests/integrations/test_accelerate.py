"""samkit.integrations.accelerate: sam_backward against a SAM loop written here from the paper.

A small MLP with dropout (float64 where the setting allows), CPU, Accelerate's own prepare /
accumulate / clip_grad_norm_ / step. The reference (``hand_sam``) implements Foret et al.'s
equations: per micro-batch ``g = grad L(w)``, ``e = rho g / ||g||_2`` over all parameters,
``grad L(w + e)``, ``w`` restored; the micro-batches' SAM gradients averaged, clipped by their
global norm as ``torch.nn.utils.clip_grad_norm_`` does, and one base step. The RNG state before
every forward is recorded from the Accelerate run, so the reference uses the same dropout masks.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from samkit.integrations import accelerate as integration  # noqa: E402
from samkit.integrations.accelerate import sam_backward  # noqa: E402
from samkit.optim import ESAM, SAM, unwrap  # noqa: E402
from samkit.optim.gsam import GSAM  # noqa: E402
from samkit.train import SharpnessAwareStep  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_sam.py"
LR = 0.1


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons; each test builds its own."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def mlp(dtype: torch.dtype = torch.float64, dropout: float = 0.2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))
    return model.to(dtype)


def loader(dtype: torch.dtype = torch.float64, n: int = 16, batch: int = 4):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def sgd_sam(model: nn.Module, rho: float = 0.05) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=0.9)


def run(
    accelerator,
    model,
    optimizer,
    data,
    *,
    accumulate=False,
    max_grad_norm=None,
    scheduler=None,
    prepared=True,
):
    """The documented loop. Returns the forwards' (RNG state, inputs, targets), in order."""
    if prepared:
        model, optimizer, data = accelerator.prepare(model, optimizer, data)
    records, targets = [], []
    model.register_forward_pre_hook(
        lambda module, args: records.append((torch.get_rng_state(), args[0].detach().clone()))
    )

    def compute_loss(x, y):
        targets.append(y)
        return F.cross_entropy(model(x), y)

    for x, y in data:
        with accelerator.accumulate(model) if accumulate else contextlib.nullcontext():
            sam_backward(accelerator, model, optimizer, compute_loss, x, y)
            if max_grad_norm and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
    return [(rng, x, y) for (rng, x), y in zip(records, targets)]


def hand_sam(
    model,
    records,
    *,
    rho=0.05,
    accumulation=1,
    max_grad_norm=None,
    lr_at=lambda t: LR,
    autocast=None,
    loss_scale=1.0,
    momentum=0.9,
):
    """SAM from the paper's equations on the recorded micro-batches (two forwards each), with
    SGD + momentum written out (v = mu v + g, w -= lr v)."""
    params, velocity = list(model.parameters()), None
    micro = records[0::2]
    for t in range(0, len(micro), accumulation):
        chunk = micro[t : t + accumulation]
        total = [torch.zeros_like(p) for p in params]
        for rng, x, y in chunk:
            g = gradient(model, params, x, y, rng, autocast, loss_scale)
            norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
            clean = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(rho * gi / norm)  # w + e
            g_sam = gradient(model, params, x, y, rng, autocast, loss_scale)
            with torch.no_grad():
                for p, w in zip(params, clean):
                    p.copy_(w)
            for s, gi in zip(total, g_sam):
                s.add_(gi / len(chunk))
        if max_grad_norm:
            norm = torch.sqrt(sum((s.double() ** 2).sum() for s in total))
            total = [s * min(1.0, max_grad_norm / (norm.item() + 1e-6)) for s in total]
        velocity = (
            total if velocity is None else [momentum * v + s for v, s in zip(velocity, total)]
        )
        with torch.no_grad():
            for p, v in zip(params, velocity):
                p.sub_(lr_at(t // accumulation) * v)


def gradient(model, params, x, y, rng, autocast, loss_scale):
    torch.set_rng_state(rng)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(x)
    loss = F.cross_entropy(out.float() if autocast else out, y) * loss_scale
    return [g / loss_scale for g in torch.autograd.grad(loss, params)]


def close(a: nn.Module, b: nn.Module, atol: float) -> bool:
    pairs = zip(unwrap_model(a).parameters(), unwrap_model(b).parameters())
    return all(torch.allclose(p, q, rtol=0, atol=atol) for p, q in pairs)


def unwrap_model(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def assert_replayed(records):
    for (rng_a, x_a, _), (rng_b, x_b, _) in zip(records[0::2], records[1::2]):
        assert torch.equal(rng_a, rng_b) and torch.equal(x_a, x_b)


# -- what the issue reports --------------------------------------------------------------------


def test_the_wrapper_hides_first_step_and_unwrap_finds_sam():
    accelerator = Accelerator(cpu=True)
    model = mlp()
    sam = sgd_sam(model)
    _, optimizer = accelerator.prepare(model, sam)
    with pytest.raises(AttributeError, match="first_step"):
        optimizer.first_step()
    assert unwrap(optimizer) is sam


def test_step_closure_inside_accumulate_is_refused():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = mlp()
    model, optimizer, data = accelerator.prepare(model, sgd_sam(model), loader())
    ran = []
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps"):
        for i, (x, y) in enumerate(data):
            with accelerator.accumulate(model):

                def closure(x=x, y=y, i=i):
                    ran.append(i)
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    return loss

                optimizer.step(closure)  # a no-op on micro-batch 0, which does not synchronise
    assert ran == []  # before the refusal: no error, ran == [1, 3]: micro-batches 0 and 2 lost


def test_step_closure_under_an_fp16_scaler_is_refused():
    model = mlp(torch.float32)
    accelerator = gpu_fp16(2.0**10)
    model, optimizer, data = accelerator.prepare(model, sgd_sam(model), loader(torch.float32))
    accelerator.scaler.scale(torch.ones(()))  # a scale in use (a resumed or earlier step's)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(data))

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        return loss

    with pytest.raises(RuntimeError, match="GradScaler"):
        optimizer.step(closure)  # before the refusal: a base step on gradients x 1024
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_step_closure_without_accumulation_is_right():
    # the closure form through the wrapper, without accumulate() and fp16: Accelerate calls
    # SAM.step(closure), which runs both passes (without RNG replay: no dropout here)
    accelerator = Accelerator(cpu=True)
    model, reference = mlp(dropout=0.0), mlp(dropout=0.0)
    model, optimizer, data = accelerator.prepare(model, sgd_sam(model), loader())
    batches = []
    for x, y in data:
        batches.append((torch.get_rng_state(), x, y))

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss

        optimizer.step(closure)
    hand_sam(reference, [b for b in batches for _ in "ab"])
    assert close(model, reference, 1e-12)


# -- sam_backward against the reference --------------------------------------------------------


def test_without_accumulate_with_dropout_and_clipping():
    model, reference, fresh = mlp(), mlp(), mlp()
    records = run(Accelerator(cpu=True), model, sgd_sam(model), loader(), max_grad_norm=0.3)
    assert len(records) == 2 * 4
    assert_replayed(records)  # the second forward saw the first's RNG state: the same masks
    hand_sam(reference, records, max_grad_norm=0.3)
    assert close(model, reference, 1e-12)
    hand_sam(fresh, records)  # the clip mattered
    assert not close(fresh, reference, 1e-6)


def test_inside_accumulate_each_micro_batch_gets_its_own_perturbation():
    model, reference = mlp(), mlp()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    sam = sgd_sam(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(sam, lambda t: 1.0 / (1 + t))
    schedule = accelerator.prepare(schedule)
    records = run(
        accelerator, model, sam, loader(), accumulate=True, max_grad_norm=0.3, scheduler=schedule
    )
    assert len(records) == 2 * 4  # every micro-batch ran both passes
    hand_sam(reference, records, accumulation=2, max_grad_norm=0.3, lr_at=lambda t: LR / (1 + t))
    assert close(model, reference, 1e-12)
    assert sam.param_groups[0]["lr"] == LR / 3  # two optimizer steps, two scheduler steps


def test_save_state_and_load_state_continue_bit_identically(tmp_path):
    # Accelerate's checkpoint (model, SAM's state dict with momentum and samkit's entry, RNG):
    # two steps, save, two more; a fresh accelerator that loads the state and runs the same two
    # steps ends with the same weights, bit for bit (dropout included: the RNG is restored).
    def build():
        accelerator = Accelerator(cpu=True)
        model = mlp()
        model, optimizer = accelerator.prepare(model, sgd_sam(model))
        return accelerator, model, optimizer

    batches = list(loader())

    def train(accelerator, model, optimizer, part):
        def compute_loss(x, y):
            return F.cross_entropy(model(x), y)

        for x, y in part:
            sam_backward(accelerator, model, optimizer, compute_loss, x, y)
            optimizer.step()
            optimizer.zero_grad()

    accelerator, model, optimizer = build()
    train(accelerator, model, optimizer, batches[:2])
    accelerator.save_state(str(tmp_path / "state"))
    train(accelerator, model, optimizer, batches[2:])
    expected = [p.detach().clone() for p in model.parameters()]
    assert unwrap(optimizer).state_dict()["samkit"]["skipped_steps"] == 0

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator, model, optimizer = build()
    accelerator.load_state(str(tmp_path / "state"))
    assert unwrap(optimizer).state  # the momentum came back
    train(accelerator, model, optimizer, batches[2:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected))


def test_bf16():
    model, reference, full = (mlp(torch.float32) for _ in range(3))
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    records = run(accelerator, model, sgd_sam(model), loader(torch.float32))
    hand_sam(reference, records, autocast=torch.bfloat16)
    assert close(model, reference, BF16_ATOL)
    hand_sam(full, records)
    assert not close(model, full, 1e-5)  # bf16 was in use


#: bf16 autocast in both, the same operations: float32 rounding of the weights only
BF16_ATOL = 1e-7


def test_fp16_on_a_cpu_is_full_precision():
    # Accelerate 1.16 builds no GradScaler and no autocast for fp16 on a CPU: the loop runs in
    # full precision. This documents the limitation.
    model, reference = mlp(), mlp()
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert accelerator.scaler is None and not accelerator.native_amp
    records = run(accelerator, model, sgd_sam(model), loader())
    hand_sam(reference, records)
    assert close(model, reference, 1e-12)


def gpu_fp16(init_scale: float, accumulation: int = 1) -> Accelerator:
    """What Accelerate builds for fp16 on a GPU (a GradScaler, fp16 autocast), on the CPU."""
    accelerator = Accelerator(
        cpu=True, mixed_precision="fp16", gradient_accumulation_steps=accumulation
    )
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accelerator.native_amp = True
    return accelerator


def test_fp16_grad_scaler_path():
    model, reference, full = (mlp(torch.float32) for _ in range(3))
    accelerator = gpu_fp16(2.0**10, accumulation=2)
    records = run(
        accelerator,
        model,
        sgd_sam(model),
        loader(torch.float32),
        accumulate=True,
        max_grad_norm=0.3,
    )
    assert accelerator.scaler.get_scale() == 2.0**10  # no overflow, no back-off
    hand_sam(
        reference,
        records,
        accumulation=2,
        max_grad_norm=0.3,
        autocast=torch.float16,
        loss_scale=2.0**10,
    )
    assert close(model, reference, FP16_ATOL)
    hand_sam(full, records, accumulation=2, max_grad_norm=0.3)
    assert not close(model, full, 1e-6)  # fp16 autocast was in use (measured 1e-5 away)


#: fp16 autocast and the same power-of-two loss scale in both: float32 rounding only
FP16_ATOL = 1e-7


def test_an_fp16_overflow_skips_the_step():
    model, init = mlp(torch.float32), mlp(torch.float32)
    accelerator = gpu_fp16(2.0**120)
    sam = sgd_sam(model)
    with pytest.warns(RuntimeWarning):
        run(accelerator, model, sam, loader(torch.float32, n=8))
    assert sam.skipped_steps == 2 and close(model, init, 0.0)
    assert accelerator.scaler.get_scale() < 2.0**120


def test_batchnorm_statistics_come_from_the_first_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    first_pass_only = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True)
    model, optimizer, data = accelerator.prepare(model, sgd_sam(model), loader())
    x, y = next(iter(data))
    sam_backward(accelerator, model, optimizer, lambda: F.cross_entropy(model(x), y))
    first_pass_only(x)  # one forward at w: what the running buffers should have seen
    for ours, reference in zip(model[1].buffers(), first_pass_only[1].buffers()):
        assert torch.equal(ours, reference)
    assert model[1].track_running_stats  # restored after the second pass


def test_a_skipped_step_puts_the_batchnorm_statistics_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    accelerator = Accelerator(cpu=True)
    model, optimizer, data = accelerator.prepare(model, sgd_sam(model), loader())
    x, y = next(iter(data))
    before = [b.clone() for b in model[1].buffers()]
    bad = x.clone()
    bad[0, 0] = float("nan")  # the first pass's statistics would be NaN
    with pytest.warns(RuntimeWarning):
        sam_backward(accelerator, model, optimizer, lambda: F.cross_entropy(model(bad), y))
        optimizer.step()
    optimizer.zero_grad()
    assert unwrap(optimizer).skipped_steps == 1
    for buffer, saved in zip(model[1].buffers(), before):
        assert torch.equal(buffer, saved)
    sam_backward(accelerator, model, optimizer, lambda: F.cross_entropy(model(x), y))
    optimizer.step()  # a good step updates them as usual
    assert unwrap(optimizer).skipped_steps == 1
    assert not torch.equal(model[1].running_mean, before[0])


def test_extra_ascent_steps_as_in_sharpness_aware_step():
    # SAM(ascent_steps=2): samkit's own step helper is the reference here
    model, reference = mlp(), mlp()
    batches = list(loader())
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, ascent_steps=2, lr=LR)
    records = run(
        Accelerator(cpu=True, gradient_accumulation_steps=2),
        model,
        optimizer,
        loader(),
        accumulate=True,
    )
    assert len(records) == 3 * len(batches)  # first pass, one more ascent pass, second pass
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, rho=0.05, ascent_steps=2, lr=LR)
    step = SharpnessAwareStep(reference, ref_opt, F.cross_entropy, accumulation_steps=2)
    for i, (x, y) in enumerate(batches):
        torch.set_rng_state(records[3 * i][0])
        step(x, y)
    assert close(model, reference, 1e-12)


def test_sharpness_aware_step_unwraps_an_accelerated_optimizer():
    model, reference = mlp(dropout=0.0), mlp(dropout=0.0)
    accelerator = Accelerator(cpu=True)
    model, optimizer, data = accelerator.prepare(model, sgd_sam(model), loader())
    step = SharpnessAwareStep(model, optimizer, F.cross_entropy, accumulation_steps=2)
    assert step.optimizer is unwrap(optimizer)
    batches = [(x, y) for x, y in data]
    for x, y in batches:
        step(x, y)
    records = [(torch.get_rng_state(), x, y) for x, y in batches for _ in "ab"]
    hand_sam(reference, records, accumulation=2)
    assert close(model, reference, 1e-12)


# -- DDP: two gloo processes (tests/conftest.py's spawn_workers runs worker() in each) ----------

WORLD = 2


def worker(rank: int) -> dict:
    # the process group exists already (tests/_worker_runner.py); Accelerate reads the world
    # from these and, finding the group initialised, uses it
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU
    model = mlp(dropout=0.0)
    records = run(accelerator, model, sgd_sam(model), loader(n=32), accumulate=True)
    return {
        "params": [p.detach() for p in unwrap_model(model).parameters()],
        "batches": [(x, y) for _, x, y in records[0::2]],
    }


def test_ddp_each_process_perturbs_with_its_own_gradient(tmp_path, spawn_workers):
    ranks = spawn_workers(Path(__file__), tmp_path, world=WORLD, timeout=120.0)
    assert all(torch.equal(p, q) for p, q in zip(ranks[0]["params"], ranks[1]["params"]))
    assert not torch.equal(ranks[0]["batches"][0][0], ranks[1]["batches"][0][0])  # own data
    # per optimizer step, 2 micro-batches on each process, each perturbed by its own gradient;
    # DDP averages the processes' sums of SAM gradients: one step over the 4 micro-batches
    steps = len(ranks[0]["batches"]) // 2
    micro = [
        (torch.get_rng_state(), x, y)
        for t in range(steps)
        for r in ranks
        for x, y in r["batches"][2 * t : 2 * t + 2]
    ]
    reference, model = mlp(dropout=0.0), mlp(dropout=0.0)
    hand_sam(reference, [m for m in micro for _ in "ab"], accumulation=2 * WORLD)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ranks[0]["params"]):
            p.copy_(q)
    assert close(model, reference, 1e-12)


# -- refusals ----------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_refused_optimizers():
    model = mlp()
    accumulating = Accelerator(cpu=True, gradient_accumulation_steps=2)
    cases = [
        (ESAM(model.parameters(), torch.optim.SGD, lr=0.1), ValueError, "ESAM is not supported"),
        (
            GSAM(model.parameters(), torch.optim.SGD, lr=0.1),
            ValueError,
            "gradient_accumulation_steps > 1",
        ),
        (torch.optim.SGD(model.parameters(), lr=0.1), TypeError, "SAM-family optimizer"),
    ]
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    for optimizer, error, message in cases:
        with pytest.raises(error, match=message) as excinfo:
            sam_backward(accumulating, model, optimizer, lambda: F.cross_entropy(model(x), y))
        assert one_line(excinfo).startswith("sam_backward")


def test_an_fp16_scaler_needs_the_prepared_optimizer():
    model = mlp(torch.float32)
    accelerator = gpu_fp16(2.0**10)
    with pytest.raises(ValueError, match="needs the optimizer passed through accelerator.prepare"):
        run(accelerator, model, sgd_sam(model), loader(torch.float32), prepared=False)


@pytest.mark.parametrize(
    "kind",
    [
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.XLA,
        DistributedType.MEGATRON_LM,
    ],
)
def test_refused_distributed_types(kind):
    stub = SimpleNamespace(distributed_type=kind, parallelism_config=None)
    with pytest.raises(ValueError, match=f"does not support distributed_type={kind.value}") as e:
        integration.check(stub, sgd_sam(mlp()))
    one_line(e)


def test_refused_parallelism_config():
    stub = SimpleNamespace(distributed_type=DistributedType.NO, parallelism_config=object())
    with pytest.raises(ValueError, match="does not support parallelism_config") as e:
        integration.check(stub, sgd_sam(mlp()))
    one_line(e)


def test_the_example_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SAM steps: 3" in proc.stdout
