"""``samkit train`` end to end, in process, on tiny data sets written in the real formats: every
data set, every augmentation, every optimizer, the seed README's command, label noise,
bootstrap, fine-tuning, EMA, the resume checks, ``samkit evaluate``, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import FAST, assert_same_weights, final_weights, read_json, read_metrics

from samkit.cli import main

TINY = [*FAST, "--model-name", "resnet_tiny", "--num-epochs", "1", "--batch-size", "8"]


def train(*argv: str) -> int:
    return main(["train", *map(str, argv)])


def check_outputs(run_dir: Path, epochs: int = 1) -> dict:
    """The files every finished run has; returns its summary."""
    config = read_json(run_dir / "config.json")
    for key in ("model_name", "num_classes", "in_channels", "dataset", "model_kwargs"):
        assert key in config  # what rebuilds the model (samkit.rundir.load_run_model)
    assert {"versions", "device_info"} <= config.keys()
    assert config["versions"]["torch"] == torch.__version__
    metrics = read_metrics(run_dir)
    assert [r["epoch"] for r in metrics] == list(range(1, epochs + 1))
    for key in ("train_loss", "train_error_rate", "gradient_norm", "param_norm", "learning_rate"):
        assert isinstance(metrics[-1][key], float)
    assert 0.0 <= metrics[-1]["test_error_rate"] <= 1.0
    summary = read_json(run_dir / "summary.json")
    assert summary["final_test_error_rate"] == metrics[-1]["test_error_rate"]
    assert summary["best_test_error_rate"] == min(r["test_error_rate"] for r in metrics)
    assert summary["images_per_sec"] > 0 and summary["train_seconds"] > 0
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    assert 1 <= len(checkpoints) <= 2
    return summary


# ---------------------------------------------------------------------------------------------
# Every data set format, every augmentation, every optimizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset,extra,classes,channels",
    [
        ("fashion_mnist", [], 10, 1),
        ("cifar10", [], 10, 3),
        ("cifar100", [], 100, 3),
        ("svhn", [], 10, 3),
        ("svhn_core", [], 10, 3),
        ("image_folder", ["--image-size", "32"], 3, 3),
        ("imagenet", ["--image-size", "32"], 3, 3),
    ],
)
def test_every_dataset_end_to_end(data, tmp_path, dataset, extra, classes, channels):
    run = tmp_path / "run"
    argv = [*TINY, "--dataset", dataset, "--data-dir", data.dirs[dataset], "--run-dir", run]
    assert train(*argv, *extra) == 0
    summary = check_outputs(run)
    config = read_json(run / "config.json")
    assert (config["num_classes"], config["in_channels"]) == (classes, channels)
    assert summary["dataset"] == dataset and summary["status"] == "completed"
    sizes = {"svhn": 40, "svhn_core": 24, "image_folder": 18, "imagenet": 18}
    assert config["train_size"] == sizes.get(dataset, 40 if "cifar" in dataset else 128)


@pytest.mark.parametrize(
    "dataset,image_level,batch_level",
    [
        ("cifar10", "none", "none"),
        ("cifar10", "basic", "none"),
        ("cifar10", "autoaugment", "none"),
        ("cifar100", "basic", "cutout"),
        ("svhn", "aa-only", "cutout"),
        ("fashion_mnist", "autoaugment", "cutout"),
        ("imagenet", "basic", "none"),  # inception crop + flip
        ("imagenet", "randaugment", "cutout"),  # inception crop + RandAugment(2, 9) + flip
    ],
)
def test_every_augmentation(data, tmp_path, dataset, image_level, batch_level):
    extra = ["--image-size", "32"] if dataset == "imagenet" else []
    argv = [
        *TINY,
        "--dataset",
        dataset,
        "--data-dir",
        data.dirs[dataset],
        "--run-dir",
        tmp_path,
        "--image_level_augmentations",
        image_level,
        "--batch_level_augmentations",
        batch_level,
        "--cutout_length",
        "8",
        *extra,
    ]
    assert train(*argv) == 0
    check_outputs(tmp_path)
    config = read_json(tmp_path / "config.json")
    assert config["image_level_augmentations"] == image_level
    assert config["batch_level_augmentations"] == batch_level


@pytest.mark.parametrize(
    "flags,description,rho_dir",
    [
        (["--optimizer", "sgd"], "SGD", "rho_0"),
        (["--sam-rho", "0"], "SGD", "rho_0"),  # the seed: rho 0 is plain SGD
        (["--optimizer", "sam"], "SAM rho=0.05", "rho_0.05"),
        (["--sam-adaptive", "--sam-rho", "0.5", "--sam-m", "4"], "ASAM rho=0.5 m=4", "rho_0.5"),
        (
            ["--optimizer", "esam", "--esam-beta", "0.6", "--esam-gamma", "0.5"],
            "ESAM rho=0.05 beta=0.6 gamma=0.5",
            "rho_0.05",
        ),
        (["--optimizer", "esam", "--esam-criterion", "loss"], "ESAM rho=0.05", "rho_0.05"),
    ],
)
def test_each_optimizer(data, tmp_path, flags, description, rho_dir):
    argv = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--output-dir", tmp_path, *flags]
    assert train(*argv) == 0
    run = tmp_path / "lr_0.1" / "wd_0.0005" / rho_dir / "seed_0"
    summary = check_outputs(run)
    assert summary["optimizer"].startswith(description)
    assert summary["steps"] == 16 and summary["skipped_steps"] == 0


def test_tensorboard_scalars_use_the_seed_names(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--run-dir", tmp_path]
    assert train(*argv, "--compute_top_5_error_rate", "true", "--num-epochs", "2") == 0
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    seed = {"train_error_rate", "train_loss", "gradient_norm", "param_norm", "learning_rate"}
    seed |= {"test_error_rate", "test_loss", "test_top_5_error_rate"}
    assert seed | {"images_per_sec"} <= tags
    assert [e.step for e in events.Scalars("test_error_rate")] == [16, 32]
    summary = check_outputs(tmp_path, epochs=2)
    assert 0.0 <= summary["final_test_top_5_error_rate"] <= summary["final_test_error_rate"]


def test_many_flags_together(data, tmp_path):
    """Seed spellings, loss-mode weight decay, clipping, smoothing, EMA, bf16, holdout,
    evaluate_every, time-based checkpoints: a run that uses them all finishes and records them."""
    argv = [
        *FAST,
        "--dataset=fashion_mnist",
        "--model_name=resnet_tiny",
        "--num_epochs=3",
        "--batch_size=16",
        "--learning_rate=0.05",
        "--weight_decay=0.001",
        "--weight-decay-mode=loss",
        "--gradient_clipping=5",
        "--label_smoothing=0.1",
        "--ema_decay=0.9",
        "--amp=bf16",
        "--use_test_set=false",
        "--evaluate_every=2",
        "--save_progress_seconds=0",
        "--run_seed=3",
        "--no-nesterov",
        "--momentum=0.8",
        f"--data-dir={data.dirs['fashion_mnist']}",
        f"--output_dir={tmp_path}",
    ]
    assert train(*argv) == 0
    run = tmp_path / "lr_0.05" / "wd_0.001" / "rho_0.05" / "seed_3"
    config = read_json(run / "config.json")
    expected = {
        "weight_decay_mode": "loss",
        "gradient_clipping": 5.0,
        "label_smoothing": 0.1,
        "ema_decay": 0.9,
        "amp": "bf16",
        "use_test_set": False,
        "eval_split": "holdout",
        "nesterov": False,
        "momentum": 0.8,
    }
    assert {k: config[k] for k in expected} == expected
    assert (config["train_size"], config["eval_size"]) == (115, 13)  # 10 % of 128 held out
    metrics = read_metrics(run)
    assert ["test_error_rate" in r for r in metrics] == [False, True, True]
    summary = read_json(run / "summary.json")
    assert summary["eval_split"] == "holdout"
    state = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert state["ema"] is not None and state["epoch"] == 3


def test_weight_decay_in_the_loss_is_the_seeds_formula(data, tmp_path):
    """With plain SGD, 0.5 * wd * ||w||^2 in the loss has the gradient wd * w, which is what the
    base SGD's weight_decay adds: both modes train (nearly) the same weights. With SAM they differ,
    since only the loss mode moves the perturbation."""
    base = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--weight-decay", "0.01"]
    runs = {}
    for optimizer in ("sgd", "sam"):
        for mode in ("decoupled", "loss"):
            run = tmp_path / f"{optimizer}-{mode}"
            argv = [*base, "--optimizer", optimizer, "--weight-decay-mode", mode, "--run-dir", run]
            assert train(*argv) == 0
            runs[optimizer, mode] = final_weights(run)
    for key, value in runs["sgd", "decoupled"].items():
        torch.testing.assert_close(runs["sgd", "loss"][key], value, rtol=1e-4, atol=1e-5)
    differ = [
        k
        for k, v in runs["sam", "decoupled"].items()
        if v.is_floating_point() and not torch.allclose(v, runs["sam", "loss"][k], atol=1e-6)
    ]
    assert differ


def test_same_seed_same_numbers(data, tmp_path):
    argv = [*TINY, "--data-dir", data.dirs["cifar10"], "--dataset", "cifar10", "--augment"]
    argv += ["basic", "--batch-level-augmentations", "cutout", "--optimizer", "esam"]
    assert train(*argv, "--run-dir", tmp_path / "a") == 0
    assert train(*argv, "--run-dir", tmp_path / "b") == 0
    assert train(*argv, "--run-dir", tmp_path / "c", "--run-seed", "1") == 0
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    a, c = final_weights(tmp_path / "a"), final_weights(tmp_path / "c")
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    keys = ("train_loss", "test_loss", "gradient_norm")
    ma, mb = read_metrics(tmp_path / "a")[-1], read_metrics(tmp_path / "b")[-1]
    assert [ma[k] for k in keys] == [mb[k] for k in keys]


# ---------------------------------------------------------------------------------------------
# The seed README's command
# ---------------------------------------------------------------------------------------------


def test_seed_readme_command_runs_as_written(data, tmp_path):
    """The seed README's command, verbatim, plus small data, one thread and a step limit: the real
    WideResnet28x10 with AutoAugment takes two SAM steps at batch size 2."""
    readme = (
        "--dataset cifar10 --model_name WideResnet28x10 --output_dir {out} "
        "--image_level_augmentations autoaugment --num_epochs 1800 --sam_rho 0.05"
    )
    argv = readme.format(out=tmp_path).split()
    extra = ["--data-dir", data.dirs["cifar10"], "--train-subset", "8", "--batch_size", "2"]
    extra += ["--max-steps", "2", "--eval-batch-size", "16", *FAST]
    assert train(*argv, *extra) == 0
    run = tmp_path / "lr_0.1" / "wd_0.0005" / "rho_0.05" / "seed_0"
    summary = read_json(run / "summary.json")
    assert summary["status"] == "max_steps" and summary["steps"] == 2
    assert summary["model"] == "WideResnet28x10" and summary["num_parameters"] > 36_000_000
    config = read_json(run / "config.json")
    assert config["num_epochs"] == 1800 and config["image_level_augmentations"] == "autoaugment"
    assert config["total_steps"] == 1800 * 4
    (record,) = read_metrics(run)
    assert record["partial_epoch"] and 0.0 <= record["test_error_rate"] <= 1.0
    assert len(list((run / "checkpoints").glob("*.pt"))) == 1


# ---------------------------------------------------------------------------------------------
# Label noise, bootstrap, fine-tuning
# ---------------------------------------------------------------------------------------------


def test_label_noise_exact_fraction_recorded_test_set_clean(data, tmp_path):
    from samkit.data import build_datasets, load_label_noise

    argv = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--run-dir", tmp_path]
    assert train(*argv, "--label-noise", "0.3", "--train-subset", "100") == 0
    record = load_label_noise(tmp_path)
    assert record.fraction == 0.3 and record.num_examples == 100 and record.seed == 0
    assert len(record.indices) == 30  # exactly round(0.3 * 100)
    written = data.fashion_mnist["train_labels"]
    assert record.original_labels == [int(written[i]) for i in record.source_indices]
    assert all(a != b for a, b in zip(record.original_labels, record.noisy_labels))
    # The training set the run used has exactly those labels; its test set is the clean file.
    train_ds, test_ds, _ = build_datasets(
        "fashion_mnist", data_dir=data.dirs["fashion_mnist"], label_noise=0.3, train_subset=100
    )
    assert int((train_ds.labels != torch.as_tensor(written[:100]).long()).sum()) == 30
    assert test_ds.labels.tolist() == data.fashion_mnist["test_labels"].tolist()
    assert read_json(tmp_path / "config.json")["label_noise"] == 0.3


def test_bootstrap_relabels_with_a_finished_runs_predictions(data, tmp_path):
    from samkit.data import build_datasets, make_loader
    from samkit.rundir import load_run_model

    teacher = tmp_path / "teacher"
    base = [*TINY, "--data-dir", data.dirs["fashion_mnist"]]
    assert train(*base, "--run-dir", teacher) == 0
    student = tmp_path / "student"
    assert train(*base, "--run-dir", student, "--bootstrap-from", teacher) == 0
    record = read_json(student / "bootstrap.json")
    assert record["source_run"] == str(teacher) and record["num_examples"] == 128
    # The labels are the teacher's argmax predictions on the unaugmented training images.
    model = load_run_model(teacher).model.to(memory_format=torch.channels_last).eval()
    train_ds, _, _ = build_datasets("fashion_mnist", data_dir=data.dirs["fashion_mnist"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run did
    try:
        with torch.inference_mode():
            x, y = next(iter(make_loader(train_ds, 1000, train=False)))
            predicted = model(x.contiguous(memory_format=torch.channels_last)).argmax(1)
    finally:
        torch.set_num_threads(threads)
    assert record["num_changed"] == int((predicted != y).sum())
    assert read_json(student / "config.json")["bootstrap_from"] == str(teacher)
    # Trained from scratch: the first epoch starts from the same initialisation as the teacher.
    check_outputs(student)


def test_fine_tuning_from_a_local_checkpoint_new_head_frozen_bn(data, tmp_path):
    from samkit.models import create_model

    torch.manual_seed(5)
    pretrained = create_model("resnet_tiny", num_classes=7, in_channels=1)
    for m in pretrained.modules():  # distinctive BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "pretrained.pt"
    torch.save(pretrained.state_dict(), path)
    run = tmp_path / "run"
    argv = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--run-dir", run]
    argv += ["--from_pretrained_checkpoint", "true", "--efficientnet_checkpoint_path", path]
    assert train(*argv, "--freeze-bn-stats") == 0
    weights = final_weights(run)
    assert weights["fc.weight"].shape == (10, 64)  # a new 10-class head
    own = pretrained.state_dict()
    frozen = [k for k in own if "running_" in k]
    assert frozen and all(torch.equal(weights[k], own[k]) for k in frozen)
    assert not torch.equal(weights["stem.0.weight"], own["stem.0.weight"])  # it did train
    config = read_json(run / "config.json")
    assert config["from_pretrained_checkpoint"] and config["freeze_bn_stats"]
    assert config["pretrained_checkpoint"] == str(path)


# ---------------------------------------------------------------------------------------------
# samkit evaluate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [False, True])
def test_evaluate_matches_the_runs_final_test_error(data, tmp_path, capsys, ema):
    run = tmp_path / "run"
    argv = [*TINY, "--data-dir", data.dirs["cifar10"], "--dataset", "cifar10", "--run-dir", run]
    argv += ["--num-epochs", "2", "--compute-top-5-error-rate"]
    if ema:
        argv += ["--ema-decay", "0.5"]
    assert train(*argv) == 0
    summary = read_json(run / "summary.json")
    capsys.readouterr()
    out_file = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--output", str(out_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == read_json(out_file)
    assert printed["weights"] == ("ema" if ema else "model")
    assert printed["test_error_rate"] == summary["final_test_error_rate"]
    assert printed["test_top_5_error_rate"] == summary["final_test_top_5_error_rate"]
    assert printed["test_loss"] == pytest.approx(summary["final_test_loss"], rel=1e-6)
    assert printed["num_examples"] == 16 and printed["step"] == summary["steps"]
    # A checkpoint file works too, and --data-dir points at the data explicitly.
    checkpoint = sorted((run / "checkpoints").glob("*.pt"))[-1]
    argv = ["evaluate", str(checkpoint), "--data-dir", str(data.dirs["cifar10"])]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test_error_rate"] == summary["final_test_error_rate"]


def test_evaluate_errors(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "no such run directory or checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Resume checks (the kill / signal tests are in test_resume.py)
# ---------------------------------------------------------------------------------------------


def test_rerun_of_a_finished_run_resumes_and_changed_settings_are_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--run-dir", run]
    assert train(*argv) == 0
    before = final_weights(run)
    capsys.readouterr()
    assert train(*argv) == 0  # nothing left to do: resumes at the end
    assert "resuming from" in capsys.readouterr().out
    assert_same_weights(final_weights(run), before)
    # Settings that change the training are refused ...
    assert train(*argv, "--batch-size", "16", "--sam-rho", "0.1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run with other settings" in err
    assert "--batch-size 8 -> 16" in err and "--sam-rho 0.05 -> 0.1" in err
    # ... those that do not are fine (threads, progress, evaluation batch size).
    assert train(*argv, "--eval-batch-size", "7", "--threads", "2") == 0
    # --no-resume starts over, but only once the new run is set up: a failure keeps the old run.
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = [*TINY, "--data-dir", empty, "--run-dir", run, "--no-resume"]
    assert train(*bad) == 2 and len(list((run / "checkpoints").glob("*.pt"))) == 1
    assert train(*argv, "--batch-size", "16", "--no-resume") == 0
    assert "discarded" in capsys.readouterr().out
    assert read_json(run / "summary.json")["steps"] == 8


# ---------------------------------------------------------------------------------------------
# Errors: one line naming the flag or path, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--learning_rate", "-0.1"],
            "argument --learning_rate: '-0.1' is not a number in (0, 1000]",
        ),
        (["--learning-rate", "0"], "argument --learning-rate: '0' is not a number in (0, 1000]"),
        (["--num_epochs", "0"], "argument --num_epochs: '0' is not an integer in [1, 100000]"),
        (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
        (["--model_name", "resnet9000"], "--model-name: unknown model 'resnet9000'"),
        (["--label-noise", "1.5"], "argument --label-noise: '1.5' is not a fraction in [0, 1]"),
        (["--esam-gamma", "0"], "argument --esam-gamma: '0' is not a number in (0, 1]"),
        (["--ema_decay", "1"], "argument --ema_decay: '1' is not a number in [0, 1)"),
        (["--use_test_set", "perhaps"], "argument --use_test_set: 'perhaps' is not true or false"),
        (["--no-resume=1"], "argument --no-resume: takes no value"),
        (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
        (["--device", "toaster"], "--device: 'toaster' is not a torch device"),
        (["--data-dir", "/no/such/dir"], "--data-dir /no/such/dir: no such directory"),
        (["--bootstrap-from", "/no/such/run"], "--bootstrap-from /no/such/run: no such run"),
        (
            ["--pretrained-checkpoint", "/no/such/file.pt"],
            "--pretrained-checkpoint /no/such/file.pt: no such file",
        ),
        (["--from_pretrained_checkpoint", "true"], "--from-pretrained-checkpoint: needs the"),
        (["--optimizer", "sgd", "--sam-rho", "0.1"], "--sam-rho 0.1: has no effect"),
        (["--sam-m", "4", "--sam-rho", "0"], "--sam-m: m-sharpness needs"),
        (["--image-size", "64"], "--image-size: only for imagenet / image_folder"),
        (["--augment", "randaugment"], "--image-level-augmentations: image_level 'randaugment'"),
        (["--dataset", "imagenet", "--augment", "aa-only"], "--image-level-augmentations:"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    assert exit_status(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("samkit train: error: ")
    assert "Traceback" not in err


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


def test_data_problems_exit_2_naming_paths(data, tmp_path, no_default_data, capsys):
    out = tmp_path / "out"
    home = tmp_path / "home"  # no_default_data empties $HOME and unsets $SAMKIT_DATA
    # Missing data: the paths searched are named, nothing is written.
    assert train(*TINY, "--dataset", "svhn", "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("samkit train: error: svhn: data not found")
    assert str(home / ".cache/samkit/svhn") in err and "Traceback" not in err
    assert not out.exists()
    # A subset larger than the data set names the flag.
    argv = [*TINY, "--data-dir", data.dirs["cifar10"], "--dataset", "cifar10"]
    assert train(*argv, "--train-subset", "1000", "--output-dir", out) == 2
    assert "--train-subset: train_subset=1000 but cifar10 has 40" in capsys.readouterr().err
    # A teacher run for another data set cannot bootstrap this one.
    teacher = tmp_path / "teacher"
    assert train(*argv, "--run-dir", teacher) == 0
    fm = [*TINY, "--data-dir", data.dirs["fashion_mnist"], "--bootstrap-from", teacher]
    assert train(*fm, "--run-dir", tmp_path / "student") == 2
    assert "--bootstrap-from" in capsys.readouterr().err
    # A corrupt file is named.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in data.dirs["fashion_mnist"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:60])
    assert train(*TINY, "--data-dir", broken, "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "idx" in err and "Traceback" not in err


def test_subprocess_error_has_no_traceback(tmp_path):
    env_argv = [sys.executable, "-m", "samkit", "train", "--dataset", "cifar10", "--data-dir"]
    proc = subprocess.run(
        [*env_argv, str(tmp_path), "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("samkit train: error: cifar10: data not found")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
