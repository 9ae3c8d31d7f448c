"""samkit.integrations.transformers: SAMTrainer against a SAM loop written here from the paper.

Tiny BERTs built from a config (nothing is downloaded), integer token ids, CPU. The reference
(``hand_sam``) implements Foret et al.'s equations directly: per micro-batch ``g = grad L(w)``,
``e = rho g / ||g||_2`` over all parameters, ``grad L(w + e)`` at the perturbed weights, ``w``
restored; the micro-batches' SAM gradients averaged, clipped by their global norm as
``torch.nn.utils.clip_grad_norm_`` does, and one base step. The batches and the RNG state before
every forward are recorded from the Trainer's run by a forward pre-hook, so the reference sees the
same data in the same order (and, where dropout is on, the same masks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from samkit.integrations import transformers as integration  # noqa: E402
from samkit.integrations.transformers import SAMTrainer  # noqa: E402
from samkit.optim import ESAM, SAM  # noqa: E402
from samkit.optim.friendly_sam import FriendlySAM  # noqa: E402

VOCAB, SEQ, LABELS = 40, 6, 3
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_sam.py"


def tiny_bert(dropout: float = 0.0, dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=SEQ,
        num_labels=LABELS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = BertForSequenceClassification(config).to(dtype)
    # Its forward takes **kwargs but its loss ignores num_items_in_batch, so the Trainer would add
    # the micro-batches' mean losses; this makes it divide by gradient_accumulation_steps (a mean)
    model.accepts_loss_kwargs = False
    return model


def dataset(n: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, LABELS, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def arguments(tmp_path: Path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="no",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        seed=7,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def sgd_sam(model, rho: float = 0.05) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9)


def record_forwards(model) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Every forward's RNG state and inputs, in order (a forward pre-hook)."""
    records = []

    def hook(module, args, kwargs):
        batch = {k: kwargs[k].detach().clone() for k in ("input_ids", "labels")}
        records.append((torch.get_rng_state(), batch))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return records


def train(model, args, optimizers=(None, None), data=None, **kwargs):
    records = record_forwards(model)
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=data or dataset(), optimizers=optimizers, **kwargs
    )
    trainer.train()
    return trainer, records


def hand_sam(
    model,
    records,
    *,
    rho,
    accumulation,
    base_step,
    max_grad_norm=None,
    replay=True,
    autocast=None,
    loss_scale=1.0,
):
    """SAM from the paper's equations on the recorded micro-batches (two forwards each).

    ``loss_scale``: fp16's static loss scaling, backward of ``S * loss`` and gradients / S."""
    params = list(model.parameters())
    micro = records[0::2]  # the first forward of each micro-batch
    for t in range(0, len(micro), accumulation):
        total = [torch.zeros_like(p) for p in params]
        chunk = micro[t : t + accumulation]
        for rng, batch in chunk:
            amp = (autocast, loss_scale)
            g = gradient(model, params, batch, rng, *amp)
            norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
            clean = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(rho * gi / norm)  # w + e
            # replay=False: the second forward draws new dropout masks
            g_sam = gradient(model, params, batch, rng if replay else None, *amp)
            with torch.no_grad():
                for p, w in zip(params, clean):
                    p.copy_(w)  # w restored
            for s, gi in zip(total, g_sam):
                s.add_(gi / len(chunk))
        if max_grad_norm:
            norm = torch.sqrt(sum((s.double() ** 2).sum() for s in total))
            coef = min(1.0, max_grad_norm / (norm.item() + 1e-6))
            total = [s * coef for s in total]
        base_step(t // accumulation, params, total)


def gradient(model, params, batch, rng, autocast, loss_scale):
    """grad of the mean loss of ``batch`` (RNG state ``rng`` set first, unless None)."""
    if rng is not None:
        torch.set_rng_state(rng)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(**batch).loss * loss_scale
    return [g / loss_scale for g in torch.autograd.grad(loss, params)]


def sgd_momentum(lr_at, momentum=0.9):
    """SGD with momentum (torch's convention: v = mu v + g, w -= lr v), written out."""
    velocity = {}

    def step(t, params, grads):
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                velocity[i] = g.clone() if i not in velocity else momentum * velocity[i] + g
                p.sub_(lr_at(t) * velocity[i])

    return step


def close(a, b, atol: float) -> bool:
    return all(
        torch.allclose(p, q, rtol=0, atol=atol) for p, q in zip(a.parameters(), b.parameters())
    )


def assert_both_passes_replayed(records):
    assert len(records) % 2 == 0
    for (rng_a, batch_a), (rng_b, batch_b) in zip(records[0::2], records[1::2]):
        assert torch.equal(rng_a, rng_b)
        assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)


# -- the issue, and the one-line fix -----------------------------------------------------------


def test_the_plain_trainer_cannot_step_sam(tmp_path):
    model = tiny_bert()
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=dataset(),
        optimizers=(sgd_sam(model), None),
    )
    with pytest.raises(RuntimeError, match="needs a closure"):
        trainer.train()


def test_accumulated_micro_batches_each_get_their_own_perturbation(tmp_path):
    model, reference = tiny_bert(), tiny_bert()
    trainer, records = train(model, arguments(tmp_path), (sgd_sam(model), None))
    assert len(records) == 2 * 3 * 2  # two passes x 3 steps x 2 micro-batches
    assert_both_passes_replayed(records)
    hand_sam(reference, records, rho=0.05, accumulation=2, base_step=sgd_momentum(lambda t: 0.1))
    assert close(model, reference, 1e-12)
    assert trainer.state.global_step == 3 and trainer.optimizer.optimizer.skipped_steps == 0


def test_clipping_acts_on_the_sam_gradient_with_a_linear_schedule(tmp_path):
    model, reference, unclipped = tiny_bert(seed=2), tiny_bert(seed=2), tiny_bert(seed=2)
    args = arguments(tmp_path, max_grad_norm=0.05, lr_scheduler_type="linear", max_steps=4)
    trainer, records = train(model, args, (sgd_sam(model, rho=0.1), None))
    linear = sgd_momentum(lambda t: 0.1 * (4 - t) / 4)
    hand_sam(reference, records, rho=0.1, accumulation=2, max_grad_norm=0.05, base_step=linear)
    assert close(model, reference, 1e-12)
    assert trainer.lr_scheduler.get_last_lr() == [0.0]  # 4 steps of 4 taken
    # the clip mattered: without it the reference ends elsewhere
    linear = sgd_momentum(lambda t: 0.1 * (4 - t) / 4)
    hand_sam(unclipped, records, rho=0.1, accumulation=2, base_step=linear)
    assert not close(unclipped, reference, 1e-6)


def test_dropout_masks_are_replayed_in_the_second_pass(tmp_path):
    model, reference, fresh_masks = (tiny_bert(dropout=0.2, seed=3) for _ in range(3))
    trainer, records = train(model, arguments(tmp_path), (sgd_sam(model), None))
    assert_both_passes_replayed(records)  # the same RNG state before both forwards
    hand_sam(reference, records, rho=0.05, accumulation=2, base_step=sgd_momentum(lambda t: 0.1))
    assert close(model, reference, 1e-12)
    hand_sam(
        fresh_masks,
        records,
        rho=0.05,
        accumulation=2,
        replay=False,
        base_step=sgd_momentum(lambda t: 0.1),
    )
    assert not close(fresh_masks, reference, 1e-6)


def test_without_an_optimizer_the_trainers_own_is_wrapped(tmp_path):
    model, reference = tiny_bert(seed=4), tiny_bert(seed=4)
    args = arguments(tmp_path, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    trainer, records = train(model, args, rho=0.1)
    sam = trainer.optimizer.optimizer
    assert type(sam) is SAM and type(sam.base_optimizer) is torch.optim.AdamW
    assert [g["rho"] for g in sam.param_groups] == [0.1, 0.1]
    decay = set(trainer.get_decay_parameter_names(reference))
    named = list(reference.named_parameters())
    adamw = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
    )

    def step(t, params, grads):
        for p, g in zip(params, grads):
            p.grad = g
        adamw.step()

    hand_sam(reference, records, rho=0.1, accumulation=2, max_grad_norm=1.0, base_step=step)
    # Adam divides by sqrt(v): float64 rounding of near-zero gradients comes out larger than SGD's
    assert close(model, reference, 1e-10)


def test_bf16_autocast_in_both_passes(tmp_path):
    model, reference = tiny_bert(dtype=torch.float32), tiny_bert(dtype=torch.float32)
    trainer, records = train(model, arguments(tmp_path, bf16=True), (sgd_sam(model), None))
    assert trainer.accelerator.native_amp and trainer.accelerator.mixed_precision == "bf16"
    hand_sam(
        reference,
        records,
        rho=0.05,
        accumulation=2,
        autocast=torch.bfloat16,
        base_step=sgd_momentum(lambda t: 0.1),
    )
    assert close(model, reference, BF16_ATOL)
    float32 = tiny_bert(dtype=torch.float32)
    hand_sam(float32, records, rho=0.05, accumulation=2, base_step=sgd_momentum(lambda t: 0.1))
    assert not close(model, float32, 1e-6)  # bf16 was in use


#: bf16 autocast in both, same operations; measured 1.9e-9 (float32 ulps of the weights), while
#: the float32 reference is 1.5e-4 away
BF16_ATOL = 1e-7


def test_fp16_on_a_cpu_is_full_precision(tmp_path):
    # Accelerate 1.16 builds no GradScaler and no autocast for fp16 on a CPU: the Trainer (and
    # SAMTrainer) then trains in full precision. This documents that limitation.
    model, reference = tiny_bert(), tiny_bert()
    trainer, records = train(model, arguments(tmp_path, fp16=True), (sgd_sam(model), None))
    assert trainer.accelerator.scaler is None and not trainer.accelerator.native_amp
    hand_sam(reference, records, rho=0.05, accumulation=2, base_step=sgd_momentum(lambda t: 0.1))
    assert close(model, reference, 1e-12)


def gpu_fp16_on_cpu(trainer: SAMTrainer, init_scale: float) -> SAMTrainer:
    """What Accelerate sets up for fp16 on a GPU (a GradScaler, fp16 autocast), on the CPU."""
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.accelerator.native_amp = True
    return trainer


def test_fp16_grad_scaler_path(tmp_path):
    model, reference = tiny_bert(dtype=torch.float32), tiny_bert(dtype=torch.float32)
    records = record_forwards(model)
    args = arguments(tmp_path, fp16=True, max_grad_norm=0.5)
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=dataset(), optimizers=(sgd_sam(model), None)
    )
    gpu_fp16_on_cpu(trainer, 2.0**12).train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**12  # no overflow, no back-off
    hand_sam(
        reference,
        records,
        rho=0.05,
        accumulation=2,
        max_grad_norm=0.5,
        autocast=torch.float16,
        loss_scale=2.0**12,
        base_step=sgd_momentum(lambda t: 0.1),
    )
    assert close(model, reference, FP16_ATOL)
    unscaled = tiny_bert(dtype=torch.float32)
    hand_sam(
        unscaled,
        records,
        rho=0.05,
        accumulation=2,
        max_grad_norm=0.5,
        autocast=torch.float16,
        base_step=sgd_momentum(lambda t: 0.1),
    )
    assert not close(unscaled, reference, FP16_ATOL)  # loss scaling changes fp16 gradients


#: fp16 autocast and the same power-of-two loss scale in both: float32 rounding only
FP16_ATOL = 1e-7


def test_an_fp16_overflow_skips_the_step_and_the_lr_schedule(tmp_path):
    model, init = tiny_bert(dtype=torch.float32), tiny_bert(dtype=torch.float32)
    args = arguments(tmp_path, fp16=True, lr_scheduler_type="linear", max_steps=2)
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=dataset(), optimizers=(sgd_sam(model), None)
    )
    with pytest.warns(RuntimeWarning):
        gpu_fp16_on_cpu(trainer, 2.0**120).train()
    sam = trainer.optimizer.optimizer
    assert sam.skipped_steps == 2 and close(model, init, 0.0)
    assert trainer.accelerator.scaler.get_scale() < 2.0**120
    assert trainer.lr_scheduler.get_last_lr() == [0.1]  # not advanced by skipped steps


class BatchNormNet(torch.nn.Module):
    """A model with BatchNorm, in the Trainer's calling convention (keyword inputs, a loss)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2)
        ).double()

    def forward(self, x, labels):
        logits = self.net(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_a_skipped_step_puts_the_batchnorm_statistics_back(tmp_path):
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    x[0, 0] = float("nan")  # the first pass's batch statistics would be NaN
    model = BatchNormNet()
    before = [b.clone() for b in model.net[1].buffers()]
    args = arguments(tmp_path, gradient_accumulation_steps=1, max_steps=1)
    data = [{"x": x[i], "labels": labels[i]} for i in range(4)]
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=data, optimizers=(sgd_sam(model), None)
    )
    with pytest.warns(RuntimeWarning):
        trainer.train()
    assert trainer.optimizer.optimizer.skipped_steps == 1
    for buffer, saved in zip(model.net[1].buffers(), before):
        assert torch.equal(buffer, saved)


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    data = dataset(32, seed=5)  # 4 steps per epoch: the checkpoint is in the middle of one
    whole = tiny_bert(dropout=0.1, seed=6)
    args = arguments(
        tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear"
    )
    train(whole, args, (sgd_sam(whole), None), data=data)
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["samkit"] == {"skipped_steps": 0} and saved["state"]  # momentum buffers
    resumed = tiny_bert(dropout=0.1, seed=99)  # the checkpoint's weights replace these
    args = arguments(
        tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear"
    )
    trainer = SAMTrainer(
        model=resumed, args=args, train_dataset=data, optimizers=(sgd_sam(resumed), None)
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    assert close(resumed, whole, 0.0)


# -- refusals ----------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_refused_optimizers(tmp_path):
    model, data = tiny_bert(), dataset()
    with_policy = sgd_sam(model)
    with_policy.ascent_policy = object()  # a variant that skips the ascent on some steps
    cases = [
        (
            ESAM(model.parameters(), torch.optim.SGD, lr=0.1),
            {},
            ValueError,
            "ESAM is not supported",
        ),
        (
            FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1),
            {},
            ValueError,
            "gradient_accumulation_steps > 1",
        ),
        (
            torch.optim.SGD(model.parameters(), lr=0.1),
            {},
            TypeError,
            "needs a samkit SAM-family optimizer",
        ),
        (sgd_sam(model), {"rho": 0.1}, ValueError, "rho is for the SAM that SAMTrainer builds"),
        (with_policy, {}, ValueError, "with an ascent_policy .* is not supported"),
    ]
    for optimizer, kwargs, error, message in cases:
        with pytest.raises(error, match=message) as excinfo:
            SAMTrainer(
                model=model,
                args=arguments(tmp_path),
                train_dataset=data,
                optimizers=(optimizer, None),
                **kwargs,
            )
        assert "SAMTrainer" in one_line(excinfo)


@pytest.mark.parametrize(
    "change, setting",
    [
        ({"is_deepspeed_enabled": True}, "deepspeed"),
        ({"is_fsdp_enabled": True}, "fsdp"),
        ({"parallelism_config": object()}, "parallelism_config"),
        ({"n_gpu": 2}, "n_gpu > 1"),
        ({"optim": "lomo"}, "optim=lomo"),
    ],
)
def test_refused_settings(change, setting):
    args = dict(n_gpu=1, optim="adamw_torch", fsdp="", parallelism_config=None)
    args.update({k: v for k, v in change.items() if k in args})
    trainer = SimpleNamespace(
        args=SimpleNamespace(**args), is_deepspeed_enabled=False, is_fsdp_enabled=False
    )
    for k, v in change.items():
        if k.startswith("is_"):
            setattr(trainer, k, v)
    with pytest.raises(ValueError, match=f"SAMTrainer does not support {setting}") as excinfo:
        integration._refuse_settings(trainer)
    one_line(excinfo)


def test_lomo_is_refused(tmp_path):
    args = arguments(tmp_path, optim="adalomo")
    with pytest.raises(ValueError, match="SAMTrainer does not support optim=adalomo") as excinfo:
        SAMTrainer(model=tiny_bert(), args=args, train_dataset=dataset())
    one_line(excinfo)


def test_the_example_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "2", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SAM steps: 2" in proc.stdout
