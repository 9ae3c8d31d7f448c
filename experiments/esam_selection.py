"""Which samples does ESAM's data selection keep under label noise?

ESAM's second pass runs on the ``gamma * B`` samples of each batch ranked highest by its SDS
criterion: the sharpness ``L(w + e) - L(w)`` per sample (the paper), or the clean loss ``L(w)``
(``--esam-criterion loss``, no extra forward). With noisy labels the highest-loss samples are
likely the mislabelled ones, and the update would then be driven by them. This script measures it:
it trains as ``experiments/sam_family.toml``'s ESAM cells do (the same config, data, model,
optimizer and step as ``samkit train``, float32, one thread) and records, per epoch, the share of
mislabelled samples among those each step selected, against their share in the batches::

    python experiments/esam_selection.py [--epochs 15] [--seeds 0] \\
        [--output experiments/reports/esam_selection]

Writes ``selection.json`` and ``selection.md`` in ``--output`` and prints the table. With the
full 15 epochs and seed 0 the runs are those of the sweep's cells (the test error printed at the
end is theirs), so the measurement is of the runs the report shows.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from samkit.data import make_loader
from samkit.train import build
from samkit.train.checks import config_from_values
from samkit.train.evaluate import evaluate_model

BASE = dict(  # experiments/sam_family.toml's base and ESAM cells
    train_subset=10000,
    label_noise=0.4,
    num_epochs=15,
    amp="none",
    optimizer="esam",
    sam_rho=0.1,
    tensorboard=False,
)


def measure(criterion: str, seed: int, epochs: int, data_dir: str | None) -> dict[str, Any]:
    values = dict(BASE, esam_criterion=criterion, run_seed=seed)
    if data_dir:
        values["data_dir"] = data_dir
    cfg = config_from_values(values)
    device = torch.device("cpu")
    data = build.build_data(cfg)
    flipped = torch.zeros(len(data.train), dtype=torch.bool)
    flipped[data.train.label_noise.indices] = True
    model, _ = build.build_model(cfg, data.info, device)
    optimizer = build.build_optimizer(cfg, model)
    step = build.build_step(cfg, model, optimizer, device, amp="none")
    loader = make_loader(data.train, cfg.batch_size, train=True, seed=seed, indices=True)
    _, eval_loader = build.build_loaders(cfg, data, device)
    schedule = build.build_schedule(cfg, optimizer, len(loader))

    chosen: list[torch.Tensor] = []
    select = optimizer.select_samples

    def recording_select(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        index = select(*args, **kwargs)
        chosen.append(index)
        return index

    optimizer.select_samples = recording_select  # type: ignore[method-assign]
    rows = []
    for epoch in range(1, epochs + 1):
        model.train()
        kept = kept_flipped = seen = seen_flipped = 0
        loader.set_epoch(epoch - 1)
        for x, y, index in loader:
            schedule.apply()
            chosen.clear()
            step(x, y)
            schedule.step()
            noisy = flipped[index]
            seen, seen_flipped = seen + len(index), seen_flipped + int(noisy.sum())
            for sel in chosen:  # one per step (no m-sharpness chunks here)
                picked = noisy if sel is None else noisy[sel]
                kept, kept_flipped = kept + len(picked), kept_flipped + int(picked.sum())
        rows.append(
            {
                "epoch": epoch,
                "mislabelled_in_batches": seen_flipped / seen,
                "mislabelled_in_selected": kept_flipped / kept,
                "selected": kept / seen,
            }
        )
        row = rows[-1]
        print(
            f"{criterion} seed {seed} epoch {epoch}: mislabelled "
            f"{row['mislabelled_in_batches']:.3f} of the batches, "
            f"{row['mislabelled_in_selected']:.3f} of the selected",
            file=sys.stderr,
            flush=True,
        )
    test = evaluate_model(model, eval_loader, build.memory_format_for(device))
    return {"criterion": criterion, "seed": seed, "epochs": rows, "test": test}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs to train (of 15)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-dir", default=None, help="as samkit train's --data-dir")
    parser.add_argument("--output", type=Path, default=Path("experiments/reports/esam_selection"))
    args = parser.parse_args(argv)
    if not 1 <= args.epochs <= BASE["num_epochs"]:
        parser.error(f"--epochs must be 1 to {BASE['num_epochs']}, got {args.epochs}")
    torch.set_num_threads(1)
    runs = [
        measure(criterion, seed, args.epochs, args.data_dir)
        for criterion in ("sharpness", "loss")
        for seed in args.seeds
    ]
    lines = [
        "| criterion | seed | epoch | mislabelled in the batches | among the selected |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        for row in run["epochs"]:
            lines.append(
                f"| {run['criterion']} | {run['seed']} | {row['epoch']} | "
                f"{row['mislabelled_in_batches']:.1%} | {row['mislabelled_in_selected']:.1%} |"
            )
    table = "\n".join(lines)
    args.output.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python experiments/esam_selection.py " + " ".join(argv or sys.argv[1:]),
        "settings": BASE,
        "machine": {"processor": platform.processor(), "torch": torch.__version__},
        "runs": runs,
    }
    (args.output / "selection.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.output / "selection.md").write_text(
        "# ESAM's selected samples under 40% label noise\n\n"
        f"`{record['command'].strip()}` (see the script's docstring).\n\n{table}\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
