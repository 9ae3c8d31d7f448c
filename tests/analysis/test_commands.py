"""``samkit hessian / sharpness / landscape / compare`` end to end through ``samkit.cli.main``.

Run directories are built by hand (``config.json`` + a checkpoint from ``save_checkpoint``) on the
tiny Fashion-MNIST of ``tests/conftest.py`` (real IDX gzip files). Every number a command writes
must EQUAL what the library function gives on the same data subset, which the tests rebuild
independently from the documented recipe (seeded permutation, eval transform, fixed batches).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from samkit.analysis import (
    HessianOperator,
    evaluate_loss,
    filter_normalized_direction,
    hessian_top_eigenvalues,
    interpolation_curve,
    loss_surface_1d,
    loss_surface_2d,
    m_sharpness,
    power_iteration_lambda_max,
    progress,
    sharpness,
    slq_density,
)
from samkit.cli import main
from samkit.data import build_datasets, make_loader
from samkit.models import create_model
from samkit.rundir import load_run_model, save_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# resnet_tiny, cut down to two narrow stages (~1.6k parameters): BatchNorm, convolutions, a
# residual shortcut, and fast enough for exact comparisons.
MODEL_KWARGS = {"widths": [4, 8], "depths": [1, 1]}
CE = nn.CrossEntropyLoss()


def make_run(
    run: Path,
    data_dir: Path,
    seed: int = 0,
    step: int = 10,
    model_kwargs: dict | None = None,
    model: nn.Module | None = None,
) -> Path:
    """A run directory as ``samkit train`` writes it: config.json + checkpoints/ckpt-*.pt."""
    kwargs = MODEL_KWARGS if model_kwargs is None else model_kwargs
    if model is None:
        torch.manual_seed(seed)
        model = create_model("resnet_tiny", num_classes=10, in_channels=1, **kwargs)
        with torch.no_grad():  # non-trivial BatchNorm statistics, which eval mode must use
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
    run.mkdir(parents=True)
    config = {
        "model_name": "resnet_tiny",
        "num_classes": 10,
        "in_channels": 1,
        "model_kwargs": kwargs,
        "dataset": "fashion_mnist",
        "data_dir": str(data_dir),
        "sam_rho": 0.05,
        "run_seed": seed,
    }
    (run / "config.json").write_text(json.dumps(config, indent=2))
    save_checkpoint({"model": model.state_dict(), "step": step}, run / "checkpoints", step)
    return run


def reference_batches(
    data_dir: Path, n: int, batch_size: int, seed: int, split: str = "train"
) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The documented subset: ``randperm(len, seed)[:n]`` of the split, eval transform."""
    train_ds, eval_ds, _ = build_datasets(
        "fashion_mnist", data_dir=data_dir, use_test_set=True, image_level="none"
    )
    ds = train_ds if split == "train" else eval_ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return idx.tolist(), list(make_loader(ds.subset(idx), batch_size, train=False))


def cli(argv: list[str]) -> int:
    """``samkit.cli.main`` with argparse's SystemExit (bad flags) turned into the status."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def run_a(tmp_path, fmnist_dir) -> Path:
    return make_run(tmp_path / "runs" / "a", fmnist_dir, seed=0)


def assert_one_line_error(err: str, command: str, *needles: str) -> None:
    assert err.startswith(f"samkit {command}: error: ") or err.startswith("samkit: error: "), err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


# --------------------------------------------------------------------------------------------
# samkit hessian
# --------------------------------------------------------------------------------------------


def test_hessian_lanczos_and_density_equal_the_library(run_a, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "hessian"
    argv = ["hessian", str(run_a), "--output", str(out), "--num-samples", "48"]
    argv += ["--batch-size", "20", "--seed", "3", "--max-steps", "30", "--no-progress"]
    argv += ["--density", "--probes", "2", "--lanczos-steps", "12"]
    assert cli(argv) == 0
    stdout = capsys.readouterr().out
    assert "lambda_max" in stdout and f"wrote {out / 'hessian.json'}" in stdout

    result = load_json(out / "hessian.json")
    indices, batches = reference_batches(fmnist_dir, 48, 20, seed=3)
    assert [len(y) for _, y in batches] == [20, 20, 8]
    assert result["data"]["indices"] == indices
    assert result["data"]["num_examples"] == 48 and result["data"]["split"] == "train"
    assert result["source"]["step"] == 10
    assert Path(result["source"]["checkpoint"]).parent == (run_a / "checkpoints").resolve()

    model = load_run_model(run_a).model
    ref = hessian_top_eigenvalues(model, CE, batches, k=5, num_steps=30, tol=1e-6, seed=3)
    assert result["method"] == "lanczos"
    assert result["eigenvalues"] == ref.eigenvalues  # exact: same data, same arithmetic
    assert result["lambda_max"] == ref.lambda_max == max(ref.eigenvalues)
    assert result["lambda_max_over_lambda_5"] == ref.eigenvalues[0] / ref.eigenvalues[4]
    assert result["loss"] == ref.loss
    assert result["residuals"] == ref.residuals
    assert result["num_params"] == sum(p.numel() for p in model.parameters())

    density = load_json(out / "hessian_density.json")
    op = HessianOperator(model, CE, batches)
    dens = slq_density(op, op.dim, num_probes=2, num_steps=12, seed=3)
    assert density["density"] == dens.density.tolist()
    assert density["grid"] == dens.grid.tolist()
    assert density["nodes"] == [n.tolist() for n in dens.nodes]
    assert density["weights"] == [w.tolist() for w in dens.weights]
    assert np.trapezoid(density["density"], density["grid"]) == pytest.approx(1.0, abs=1e-9)
    assert (out / "hessian_density.png").read_bytes()[:8] == PNG_MAGIC
    assert result["density"]["trace_estimate"] == density["trace_estimate"]


def test_hessian_power_iteration_and_checkpoint_file(run_a, fmnist_dir, tmp_path):
    ckpt = next((run_a / "checkpoints").glob("ckpt-*.pt"))
    out = tmp_path / "power"
    argv = ["hessian", str(ckpt), "--method", "power", "--output", str(out)]
    argv += ["--num-samples", "32", "--split", "test", "--max-steps", "15", "--no-progress"]
    assert cli(argv) == 0
    result = load_json(out / "hessian.json")
    _, batches = reference_batches(fmnist_dir, 32, 128, seed=0, split="test")
    op = HessianOperator(load_run_model(ckpt).model, CE, batches)
    ref = power_iteration_lambda_max(op, op.dim, max_iters=15, tol=1e-5, seed=0)
    assert result["method"] == "power"
    assert result["lambda_max"] == ref.eigenvalue
    assert result["num_power_iterations"] == ref.num_iters
    assert result["lambda_max_over_lambda_5"] is None
    assert result["data"]["split"] == "test" and result["data"]["split_size"] == 32
    assert not (out / "hessian_density.json").exists()


def test_hessian_defaults_one_batch_and_progress_lines_on_a_log(
    run_a, fmnist_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)  # a line at every product
    monkeypatch.setattr(progress, "LINE_STEP", 0.0)
    out = tmp_path / "defaults"
    assert cli(["hessian", str(run_a), "--output", str(out), "--max-steps", "6"]) == 0
    err = capsys.readouterr().err  # captured: not a terminal, so lines and no bar
    lines = [line for line in err.splitlines() if line.startswith("lanczos: ")]
    assert lines[0].startswith("lanczos: 1/6 HVP (17%), ") and "ETA at most" in lines[0]
    assert re.fullmatch(r"lanczos: [1-6]/6 HVP, done in \d+ s", lines[-1]), lines[-1]
    assert "\r" not in err

    result = load_json(out / "hessian.json")
    assert result["batch_sizes"] == [64]  # all 64 training images in one batch
    _, batches = reference_batches(fmnist_dir, 64, 128, seed=0)
    ref = hessian_top_eigenvalues(load_run_model(run_a).model, CE, batches, k=5, num_steps=6)
    assert result["eigenvalues"] == ref.eigenvalues
    assert result["num_hvp"] == len(lines) - 1


# --------------------------------------------------------------------------------------------
# samkit sharpness
# --------------------------------------------------------------------------------------------


def test_sharpness_and_m_sharpness_equal_the_library(run_a, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "sharp"
    argv = ["sharpness", str(run_a), "--rho", "0.1", "--steps", "3", "--m", "8", "16"]
    argv += ["--num-samples", "40", "--batch-size", "16", "--output", str(out)]
    assert cli(argv) == 0
    assert "m-sharpness m=8" in capsys.readouterr().out
    result = load_json(out / "sharpness.json")
    _, batches = reference_batches(fmnist_dir, 40, 16, seed=0)
    model = load_run_model(run_a).model
    ref = sharpness(model, CE, batches, 0.1, steps=3)
    assert result["sharpness"] == ref.to_dict()
    assert result["rho"] == 0.1 and result["steps"] == 3
    per_step = result["sharpness"]["sharpness_per_step"]
    assert len(per_step) == 3 and per_step == sorted(per_step)  # non-decreasing in k
    ms = m_sharpness(model, CE, batches, [8, 16], 0.1, steps=3)
    assert result["m_sharpness"] == [r.to_dict() for r in ms]
    assert [r["num_chunks"] for r in result["m_sharpness"]] == [5, 2]  # 40 // 8, 40 // 16


def test_default_output_is_run_dir_analysis(run_a):
    assert cli(["sharpness", str(run_a), "--num-samples", "16"]) == 0
    assert load_json(run_a / "analysis" / "sharpness.json")["m_sharpness"] == []


# --------------------------------------------------------------------------------------------
# samkit landscape
# --------------------------------------------------------------------------------------------


def test_landscape_1d_and_2d_equal_the_library(run_a, fmnist_dir, tmp_path):
    common = ["--num-samples", "24", "--points", "5", "--range", "0.5", "--seed", "7"]
    assert cli(["landscape", str(run_a), "--output", str(tmp_path / "l1"), *common]) == 0
    argv = ["landscape", str(run_a), "--output", str(tmp_path / "l2"), "--dims", "2", *common]
    assert cli(argv) == 0

    _, batches = reference_batches(fmnist_dir, 24, 128, seed=7)
    model = load_run_model(run_a).model
    alphas = np.array([-0.5, -0.25, 0.0, 0.25, 0.5])
    gen = torch.Generator().manual_seed(7)
    d1 = filter_normalized_direction(model, generator=gen)
    d2 = filter_normalized_direction(model, generator=gen)

    one = np.load(tmp_path / "l1" / "landscape_1d.npz")
    assert np.array_equal(one["alphas"], alphas)
    curve = loss_surface_1d(model, CE, batches, d1, alphas)
    assert np.array_equal(one["losses"], curve)
    assert load_json(tmp_path / "l1" / "landscape_1d.json")["losses"] == curve.tolist()
    assert one["losses"][2] == evaluate_loss(model, CE, batches)  # alpha = 0 is w itself
    assert (tmp_path / "l1" / "landscape_1d.png").read_bytes()[:8] == PNG_MAGIC

    two = np.load(tmp_path / "l2" / "landscape_2d.npz")
    surface = loss_surface_2d(model, CE, batches, d1, d2, alphas, alphas)
    assert two["surface"].shape == (5, 5)
    assert np.array_equal(two["surface"], surface)
    assert load_json(tmp_path / "l2" / "landscape_2d.json")["surface"] == surface.tolist()
    for name in ("landscape_2d_contour.png", "landscape_2d_surface.png"):
        assert (tmp_path / "l2" / name).read_bytes()[:8] == PNG_MAGIC
    summary = load_json(tmp_path / "l2" / "landscape.json")
    assert summary["landscape_2d"]["max"] == surface.max()


def test_landscape_line_between_two_checkpoints(run_a, fmnist_dir, tmp_path):
    run_b = make_run(tmp_path / "runs" / "b", fmnist_dir, seed=1)
    out = tmp_path / "line"
    argv = ["landscape", str(run_a), "--other", str(run_b / "checkpoints"), "--points", "9"]
    argv += ["--num-samples", "24", "--t-range", "-0.5", "1.5", "--output", str(out)]
    assert cli(argv) == 0
    assert not (out / "landscape_1d.npz").exists()  # --other alone: only the line
    arrays = np.load(out / "interpolation.npz")
    ts = np.linspace(-0.5, 1.5, 9)
    assert np.array_equal(arrays["ts"], ts)
    _, batches = reference_batches(fmnist_dir, 24, 128, seed=0)
    model_a, model_b = load_run_model(run_a).model, load_run_model(run_b).model
    ref = interpolation_curve(model_a, CE, batches, model_a.state_dict(), model_b.state_dict(), ts)
    assert np.array_equal(arrays["losses"], ref)
    # t = 0 and t = 1 are the two checkpoints themselves, BatchNorm statistics included
    assert arrays["losses"][2] == evaluate_loss(model_a, CE, batches)
    assert arrays["losses"][6] == evaluate_loss(model_b, CE, batches)
    meta = load_json(out / "interpolation.json")
    assert meta["loss_b"] == arrays["losses"][6]
    assert Path(meta["other"]["run_dir"]) == run_b.resolve()
    assert (out / "interpolation.png").read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------------------------
# samkit compare
# --------------------------------------------------------------------------------------------


def write_metrics(run: Path, records: list[dict], summary: dict | None = None) -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_compare_both_key_spellings(tmp_path, capsys):
    root = tmp_path / "runs"
    # the keys samkit train writes today ...
    write_metrics(
        root / "rho_0" / "seed_0",
        [
            dict(epoch=1, learning_rate=0.05, train_loss=1.0, test_error_rate=0.30,
                 test_accuracy=0.70, images_per_sec=1000.0, wall_seconds=6.0),
            dict(epoch=2, learning_rate=0.0, train_loss=0.5, test_error_rate=0.20,
                 test_accuracy=0.80, images_per_sec=1200.0, wall_seconds=11.0),
        ],
        dict(final_test_error_rate=0.2, final_test_accuracy=0.8, best_test_accuracy=0.8,
             wall_seconds=12.5),
    )  # fmt: skip
    # ... and the alternative spellings (accuracy only per epoch, lr, images_per_sec)
    write_metrics(
        root / "rho_0.05" / "seed_0",
        [
            dict(epoch=1, lr=0.05, train_loss=1.2, test_accuracy=0.75, images_per_sec=500.0),
            dict(epoch=2, lr=0.0, train_loss=0.7, test_accuracy=0.85, images_per_sec=700.0),
        ],
        dict(final_test_error_rate=0.15, best_test_error_rate=0.15, images_per_sec=650.0,
             total_time_sec=30.0),
    )  # fmt: skip
    out = tmp_path / "cmp"
    # a directory without metrics.jsonl stands for every run below it
    assert cli(["compare", str(root), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    table = (out / "comparison.md").read_text()
    assert stdout.startswith(table)
    assert table.splitlines()[2:] == [
        "| rho_0/seed_0 | 20.00 | 20.00 | 12.5 | 1100 |",
        "| rho_0.05/seed_0 | 15.00 | 15.00 | 30.0 | 650 |",
    ]
    rows = load_json(out / "comparison.json")["rows"]
    assert rows[1]["best_test_error"] == 0.15 and rows[0]["images_per_sec"] == 1100.0
    for name in ("test_error.png", "train_loss.png", "learning_rate.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    # no --output: the table is printed, nothing is written
    sgd, sam = root / "rho_0" / "seed_0", root / "rho_0.05" / "seed_0"
    assert cli(["compare", str(sgd), str(sam), "--names", "SGD", "SAM"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[2].startswith("| SGD | 20.00") and printed[3].startswith("| SAM | 15.00")


# --------------------------------------------------------------------------------------------
# Errors: one line, exit status 2, the path or flag named
# --------------------------------------------------------------------------------------------


def test_missing_run_dir(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    for command in ("hessian", "sharpness", "landscape"):
        assert cli([command, str(missing)]) == 2
        assert_one_line_error(capsys.readouterr().err, command, str(missing))
    assert cli(["compare", str(missing)]) == 2
    assert_one_line_error(capsys.readouterr().err, "compare", str(missing))


def test_corrupt_checkpoint_is_named(run_a, tmp_path, capsys):
    ckpt = next((run_a / "checkpoints").glob("ckpt-*.pt"))
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    assert cli(["hessian", str(run_a), "--output", str(tmp_path / "o")]) == 2
    assert_one_line_error(capsys.readouterr().err, "hessian", ckpt.name, "corrupt")
    assert not (tmp_path / "o").exists()  # nothing written
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert cli(["sharpness", str(ckpt)]) == 2
    assert_one_line_error(capsys.readouterr().err, "sharpness", str(ckpt))


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(fmnist_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run", fmnist_dir, seed=0, step=5)
    torch.manual_seed(1)
    newer = create_model("resnet_tiny", num_classes=10, in_channels=1, **MODEL_KWARGS)
    path = save_checkpoint({"model": newer.state_dict(), "step": 9}, run / "checkpoints", 9)
    path.write_bytes(path.read_bytes()[:-10])
    assert cli(["sharpness", str(run), "--num-samples", "16"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("samkit sharpness: warning: skipping unusable checkpoint")
    assert path.name in err and err.count("\n") == 1
    assert load_json(run / "analysis" / "sharpness.json")["source"]["step"] == 5


def test_corrupt_config_missing_data_and_bad_other(run_a, fmnist_dir, tmp_path, capsys):
    (run_a / "config.json").write_text('{"model_name": "resnet_tiny", ')
    assert cli(["hessian", str(run_a)]) == 2
    assert_one_line_error(capsys.readouterr().err, "hessian", "config.json")

    run = make_run(tmp_path / "nodata", tmp_path / "missing-data")
    assert cli(["sharpness", str(run)]) == 2
    assert_one_line_error(capsys.readouterr().err, "sharpness", "Fashion-MNIST not found")

    kwargs = {"widths": [6, 8], "depths": [1, 1]}
    other = make_run(tmp_path / "wide", fmnist_dir, model_kwargs=kwargs)
    good = make_run(tmp_path / "good", fmnist_dir)
    assert cli(["landscape", str(good), "--other", str(other)]) == 2
    assert_one_line_error(capsys.readouterr().err, "landscape", "--other", "architecture")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["hessian", "RUN", "--top-k", "0"], "--top-k: '0' is not an integer in [1, 1000]"),
        (["hessian", "RUN", "--num-samples", "many"], "--num-samples: 'many'"),
        (["hessian", "RUN", "--method", "qr"], "--method: invalid choice: 'qr'"),
        (["hessian", "RUN", "--probes", "-2"], "--probes: '-2' is not an integer in [1, 10000]"),
        (["hessian", "RUN", "--top-k", "1001"], "--top-k: '1001' is not an integer in [1, 1000]"),
        (["sharpness", "RUN", "--rho", "-0.1"], "--rho: '-0.1' is not a number in [0, 1000]"),
        (["sharpness", "RUN", "--rho", "inf"], "--rho: 'inf' is not a number in [0, 1000]"),
        (["sharpness", "RUN", "--m", "0"], "--m: '0' is not an integer in [1, 1000000000]"),
        (["sharpness", "RUN", "--m", "4", "65"], "--m 65: larger than the 64 examples"),
        (["landscape", "RUN", "--points", "1"], "--points: '1' is not an integer in [2, 10000]"),
        (["landscape", "RUN", "--range", "nan"], "--range: 'nan' is not a number in (0, 1000]"),
        (["landscape", "RUN", "--dims", "3"], "--dims: invalid choice: 3"),
        (["landscape", "RUN", "--other", "RUN", "--t-range", "1", "0"], "--t-range 1 0"),
        (["hessian", "RUN", "--device", "toaster"], "'toaster' is not a torch device"),
        (["compare"], "the following arguments are required: RUN_DIR"),
    ],
)
def test_nonsense_flags(run_a, argv, needle, capsys):
    argv = [str(run_a) if a == "RUN" else a for a in argv]
    assert cli(argv) == 2
    assert_one_line_error(capsys.readouterr().err, argv[0], needle)


def test_compare_corrupt_metrics_and_empty_dir(tmp_path, capsys):
    run = write_metrics(tmp_path / "r", [{"epoch": 1, "test_error_rate": 0.1}])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "test_err\n')
    assert cli(["compare", str(run)]) == 2
    assert_one_line_error(capsys.readouterr().err, "compare", "metrics.jsonl:2")
    (tmp_path / "empty").mkdir()
    assert cli(["compare", str(tmp_path / "empty")]) == 2
    assert_one_line_error(capsys.readouterr().err, "compare", "no metrics.jsonl")


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "samkit", "hessian", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"samkit hessian: error: {tmp_path / 'nope'}: no such run directory or checkpoint file\n"
    )
