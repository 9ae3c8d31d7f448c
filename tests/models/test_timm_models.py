"""timm models in samkit: ``timm:<name>`` in the model registry, built for the data set's channels,
checked against its image size, trained by ``samkit.train.loop.train`` on a tiny Fashion-MNIST
written in the real IDX format, fine-tuned from local timm checkpoint files (safetensors, timm's
training checkpoints, plain state_dicts), and the one-line refusals (exit 2)."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from samkit.cli import main  # noqa: E402
from samkit.models import count_parameters, create_model, is_model, model_name_problem  # noqa: E402
from samkit.models.finetune import load_pretrained  # noqa: E402
from samkit.train.checks import config_from_values  # noqa: E402
from samkit.train.errors import ConfigError  # noqa: E402
from samkit.train.loop import train  # noqa: E402

#: timm 1.0.31's tiny test models (~0.1-1M parameters), and which take Fashion-MNIST's 1x28x28.
TINY_TAKE_28PX = ["test_byobnet", "test_efficientnet", "test_mambaout", "test_nfnet", "test_resnet"]
TINY_REFUSE_28PX = ["test_coatnet", "test_convnext", "test_maxvit", "test_vit", "test_vit3"]
MODEL = "timm:test_efficientnet"  # 0.1M parameters: a step of 8 images takes milliseconds


def run_config(tmp_path, data_dir, **values):
    """A checked config of a 2-step run on the tiny data (what ``samkit train`` would run)."""
    base = dict(
        model_name=MODEL,
        data_dir=str(data_dir),
        run_dir=str(tmp_path / "run"),
        batch_size=8,
        num_epochs=1,
        max_steps=2,
        amp="none",
        threads=1,
        progress=False,
        tensorboard=False,
    )
    return config_from_values({**base, **values})


def parameters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def run_parameters(run_dir) -> dict[str, torch.Tensor]:
    from samkit.rundir import load_run_model

    return parameters(load_run_model(run_dir).model)


# -- the registry family ---------------------------------------------------------------------


def test_the_tiny_test_models_exist():
    assert set(TINY_TAKE_28PX + TINY_REFUSE_28PX) <= set(timm.list_models("test_*"))


@pytest.mark.parametrize("name", TINY_TAKE_28PX)
def test_a_timm_model_is_built_for_the_data_sets_shape(name):
    assert is_model(f"timm:{name}")
    model = create_model(f"timm:{name}", num_classes=10, in_channels=1)
    assert model.pretrained_cfg["architecture"] == name
    assert model.train()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(f"timm:{name}", 10, 1) == sum(p.numel() for p in model.parameters())


def test_keywords_reach_timm_and_loading_keywords_are_refused():
    model = create_model(MODEL, num_classes=3, in_channels=1, drop_rate=0.25)
    assert model.drop_rate == 0.25
    for kw in ({"pretrained": True}, {"pretrained_cfg_overlay": {"file": "x.pth"}}):
        with pytest.raises(ValueError, match="never downloads"):
            create_model(MODEL, **kw)


@pytest.mark.parametrize(
    "name,message",
    [
        ("timm:resnet5", "unknown timm model 'resnet5'; close matches: timm:resnet50"),
        ("timm:", "needs a timm model name"),
        ("timm:hf-hub:timm/resnet18.a1_in1k", "never a model from the Hugging Face hub"),
        ("timm:resnet18.no_such_tag", "no pretrained tag 'no_such_tag'"),
    ],
)
def test_names_that_are_no_timm_model(name, message):
    assert message in model_name_problem(name)
    with pytest.raises(ConfigError, match="^--model-name: ") as info:
        config_from_values({"model_name": name})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_pretrained_tag_only_picks_the_configuration():
    assert model_name_problem("timm:resnet18.a1_in1k") is None


def test_without_timm_the_name_is_refused_saying_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    assert main(["train", "--model-name", "timm:resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "samkit train: error: --model-name: timm:... models need the timm package" in err
    assert "pip install" in err


def test_the_cli_refuses_an_unknown_name_on_one_line(capsys):
    assert main(["train", "--model-name", "timm:resnet5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "close matches: timm:resnet50" in err


# -- image sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_REFUSE_28PX)
def test_a_model_too_big_for_28px_images_is_refused_before_any_work(name, tmp_path):
    with pytest.raises(ConfigError) as info:
        run_config(tmp_path, tmp_path / "no-such-data", model_name=f"timm:{name}")
    text = str(info.value)
    assert text.startswith(f"--model-name timm:{name}: cannot take fashion_mnist's 1x28x28 images")
    assert "--image-size" in text and "\n" not in text


def test_the_image_size_decides_for_folders():
    folder = {"model_name": "timm:test_vit3", "dataset": "image_folder"}
    with pytest.raises(ConfigError, match="3x32x32 images"):
        config_from_values({**folder, "image_size": 32})
    config_from_values({**folder, "image_size": 160})  # its own size: accepted
    config_from_values({"model_name": "timm:test_convnext", "dataset": "cifar10"})  # 32 px: fine


# -- training and fine-tuning through samkit's train() ---------------------------------------


def test_trains_two_sam_steps_on_fashion_mnist(tmp_path, fmnist_dir):
    cfg = run_config(tmp_path, fmnist_dir)
    torch.manual_seed(cfg.run_seed)
    initial = parameters(create_model(MODEL, num_classes=10, in_channels=1))
    summary = train(cfg, log=lambda msg: None)
    assert summary["status"] == "max_steps" and summary["steps"] == 2
    assert summary["optimizer"].startswith("SAM rho=0.05")
    trained = run_parameters(tmp_path / "run")
    assert trained.keys() == initial.keys()
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def imagenet_model(seed: int = 1):
    """A "pretrained" model: 3 channels, 1000 classes, weights unlike a fresh initialisation."""
    torch.manual_seed(seed)
    model = create_model(MODEL, num_classes=1000, in_channels=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def save_as(kind: str, model, path):
    state = model.state_dict()
    if kind == "safetensors":  # as timm publishes weights (model.safetensors)
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif kind == "timm_train":  # as timm's train.py saves (CheckpointSaver)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        args = argparse.Namespace(model="test_efficientnet", lr=0.1, opt="sgd", sched=None)
        checkpoint = {
            "epoch": 3,
            "arch": "test_efficientnet",
            "state_dict": state,
            "optimizer": opt.state_dict(),
            "version": 2,
            "args": args,
            "metric": 0.5,
        }
        torch.save(checkpoint, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "kind,suffix", [("safetensors", ".safetensors"), ("timm_train", ".pth.tar"), ("plain", ".pth")]
)
def test_loads_timm_checkpoints_with_a_new_head_and_one_input_channel(tmp_path, kind, suffix):
    source = imagenet_model()
    path = save_as(kind, source, tmp_path / f"pretrained{suffix}")
    target = create_model(MODEL, num_classes=10, in_channels=1)
    report = load_pretrained(target, path)
    assert sorted(report.dropped) == ["classifier.bias", "classifier.weight"]
    assert report.adapted == ["conv_stem.weight"]
    assert not (report.missing or report.unexpected or report.mismatched)
    mine, theirs = target.state_dict(), source.state_dict()
    # the stem: timm's adaptation of RGB weights to one channel is their sum
    torch.testing.assert_close(mine["conv_stem.weight"], theirs["conv_stem.weight"].sum(1, True))
    for key in mine.keys() - {"conv_stem.weight", "classifier.weight", "classifier.bias"}:
        assert torch.equal(mine[key], theirs[key]), key


def test_fine_tunes_from_a_local_safetensors_file_through_train(tmp_path, fmnist_dir):
    source = imagenet_model()
    path = save_as("safetensors", source, tmp_path / "model.safetensors")
    # a learning rate of 1e-9: after two steps the weights are still the loaded ones
    cfg = run_config(tmp_path, fmnist_dir, pretrained_checkpoint=str(path), learning_rate=1e-9)
    lines = []
    train(cfg, log=lines.append)
    line = next(line for line in lines if line.startswith(f"fine-tuning from {path}"))
    assert "new head (classifier." in line and "input channels adapted (conv_stem.weight)" in line
    trained, theirs = run_parameters(tmp_path / "run"), parameters(source)
    expected = {**theirs, "conv_stem.weight": theirs["conv_stem.weight"].sum(1, keepdim=True)}
    for key, value in trained.items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)
    assert trained["classifier.weight"].shape == (10, expected["classifier.weight"].shape[1])


def write_corrupt(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return path


def write_other_architecture(tmp_path):
    torch.manual_seed(0)
    other = create_model("timm:test_resnet", num_classes=10, in_channels=1)
    return save_as("plain", other, tmp_path / "resnet.pth")


def write_code_running(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p / "missing.safetensors", "--pretrained-checkpoint {path}: no such file"),
        (write_corrupt, "cannot read pretrained checkpoint '{path}': file is corrupt or truncated"),
        (write_other_architecture, "pretrained checkpoint '{path}' does not match EfficientNet"),
        (write_code_running, "pretrained checkpoint '{path}' holds objects that weights_only"),
    ],
    ids=["missing", "corrupt", "wrong_shapes", "runs_code"],
)
def test_bad_checkpoint_files_are_one_line_naming_the_file(
    tmp_path, fmnist_dir, capsys, make, message
):
    path = make(tmp_path)
    argv = ["train", "--model-name", MODEL, "--data-dir", str(fmnist_dir), "--run-dir",
            str(tmp_path / "run"), "--pretrained-checkpoint", str(path), "--max-steps", "1",
            "--batch-size", "8", "--amp", "none", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "pwned" not in out.out
    assert out.err.count("\n") == 1 and message.format(path=path) in out.err, out.err
