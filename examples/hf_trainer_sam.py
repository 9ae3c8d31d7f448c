"""SAM in the Hugging Face Trainer: a tiny BERT, built from a config, on random token data.

The one change from a plain Trainer script is ``Trainer`` -> ``SAMTrainer``. Gradient
accumulation, ``max_grad_norm``, bf16, LR schedules and checkpoints work as with the Trainer.

    python examples/hf_trainer_sam.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: the model is built here

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from samkit.integrations.transformers import SAMTrainer
from samkit.optim import SAM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius (default 0.05)")
    parser.add_argument("--output-dir", default=None, help="checkpoints (default: a temp dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    # random token ids; the label is whether token 1 occurs, so there is something to learn
    ids = torch.randint(0, 100, (256, 16))
    data = [{"input_ids": x, "labels": int((x == 1).any())} for x in ids]

    optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=args.rho, lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,  # each micro-batch gets its own perturbation
            max_grad_norm=1.0,  # clips the SAM gradient
            lr_scheduler_type="linear",
            logging_steps=max(1, args.steps // 4),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = SAMTrainer(
            model=model, args=training_args, train_dataset=data, optimizers=(optimizer, None)
        )
        result = trainer.train()
    print(f"SAM steps: {trainer.state.global_step}, training loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
