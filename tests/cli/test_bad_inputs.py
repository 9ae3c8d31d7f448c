"""Bad input never reaches a traceback (issue 15, item 4): every numeric flag of every command is
range-checked at parse time, and what passes the parser but cannot work (an absurd model, a grid
or Lanczos run that cannot finish, a hand-edited config.json, a checkpoint of another model, a
corrupt data file) is one line naming the flag or the file, exit status 2.

The table is generated from the parsers themselves: for every sub-command, every option whose type
is a number (:func:`samkit.cli.args.number`, which records its kind and domain) gets each of
negative, 0, nan, inf, -inf, huge and 'abc' that lies outside its domain. Everything runs in
process through ``samkit.cli.main``; no training starts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import struct
from pathlib import Path

import pytest
import torch

import samkit.cli
from samkit.cli import build_parser, limits, main
from samkit.models import MAX_PARAMETERS, count_parameters, create_model
from samkit.rundir import save_checkpoint
from samkit.train.checks import config_from_values
from samkit.train.errors import ConfigError

BAD_VALUES = ["-1", "0", "nan", "inf", "-inf", "1e300", str(10**30), "abc"]
# If a check ever regressed, a command would start: train then finds no data instead of training.
NO_DATA = ["--data-dir", "/nonexistent/samkit-bad-inputs"]
POSITIONALS = {  # a stand-in for each command's required arguments (never reached)
    "train": NO_DATA,
    "sweep": ["--dry-run"],  # and sweep lists its cells instead of running them
    "evaluate": ["RUN"],
    "hessian": ["RUN"],
    "sharpness": ["RUN"],
    "landscape": ["RUN"],
    "compare": ["RUN"],
    "report": ["SWEEP"],
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def numeric_options() -> list[tuple[str, argparse.Action]]:
    """(command, action) for every option that takes a number."""
    out = []
    for command, parser in subparsers().items():
        for action in parser._actions:
            if action.option_strings and (
                hasattr(action.type, "domain") or action.type in (int, float)
            ):
                out.append((command, action))
    return out


def accepted(action: argparse.Action, text: str) -> bool:
    """Whether ``text`` is a valid value of ``action`` (by its own type and choices)."""
    try:
        value = action.type(text)  # type: ignore[misc]
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    return action.choices is None or value in action.choices


def bad_cases() -> list:
    cases = []
    for command, action in numeric_options():
        for text in BAD_VALUES:
            if not accepted(action, text):
                flag = action.option_strings[0]
                cases.append(pytest.param(command, action, text, id=f"{command} {flag} {text!r}"))
    return cases


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def one_line_error(capsys: pytest.CaptureFixture, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"samkit {command}: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # one line, no traceback
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# --------------------------------------------------------------------------------------------
# The table: every numeric flag of every command
# --------------------------------------------------------------------------------------------


def test_the_table_covers_every_command_and_bounds_every_number():
    options = numeric_options()
    commands = {command for command, _ in options}
    assert commands >= {"train", "evaluate", "hessian", "sharpness", "landscape", "sweep", "report"}
    assert len(options) > 50
    for command, action in options:
        flag = f"{command} {action.option_strings[0]}"
        if action.type in (int, float):  # a plain type is only for a fixed set of choices
            assert action.choices is not None, flag
            continue
        domain = action.type.domain  # type: ignore[union-attr]
        # Bounded on both sides: a huge value is refused before any work, whatever the flag.
        assert domain.low is not None and domain.high is not None, flag
        assert not accepted(action, "1e300") and not accepted(action, str(10**30)), flag


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.mark.parametrize("command, action, text", bad_cases())
def test_a_bad_number_is_one_line_naming_the_flag(
    command, action, text, parser, monkeypatch, capsys
):
    monkeypatch.setattr(samkit.cli, "build_parser", lambda: parser)  # built once: most of the time
    flag = action.option_strings[0]
    nargs = action.nargs if isinstance(action.nargs, int) else 1
    # --flag=VALUE, so that '-inf' is read as a value (as a separate word argparse takes it for
    # an option); flags with several values get them as separate words.
    values = [f"{flag}={text}"] if action.nargs is None else [flag, *[text] * nargs]
    # Refused by the parser, before any work: a value that got through would meet a missing run
    # directory or data directory, an error that names no flag.
    assert run_cli([command, *values, *POSITIONALS.get(command, [])]) == 2
    err = one_line_error(capsys, command, f"argument {flag}")
    assert repr(text) in err or "expected" in err or "invalid choice" in err, err


# --------------------------------------------------------------------------------------------
# The tracebacks of issue 15, each with its flag
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--sam-rho", "1e300", "--max-steps", "1"], "argument --sam-rho: '1e300'"),
        (["train", "--sam-rho", "1001"], "is not a number in [0, 1000]"),
        (["train", "--gsam-alpha", "1e300"], "argument --gsam-alpha"),
        (["train", "--learning-rate", "1e300"], "argument --learning-rate"),
        (["train", "--run-seed", "99999999999999999999999"], "[0, 4294967295]"),
        (["train", "--run-seed", "1" + "0" * 400], "argument --run-seed"),  # past float
        (["train", "--threads", "100000"], "argument --threads: '100000' is not an integer in"),
        (["train", "--workers", "100000"], "argument --workers"),
        (["train", "--dist-timeout", "1e300"], "argument --dist-timeout"),
        (["sharpness", "RUN", "--rho", "1e300"], "argument --rho: '1e300'"),
        (["hessian", "RUN", "--top-k", "300000"], "argument --top-k: '300000'"),
        (["landscape", "RUN", "--points", "1e12"], "argument --points: '1e12'"),
        (["landscape", "RUN", "--points", "1000000"], "argument --points: '1000000'"),
        (["evaluate", "RUN", "--threads", "100000"], "argument --threads"),
        (["sweep", "--seeds", "0", str(2**64)], "argument --seeds"),
    ],
)
def test_issue_15_tracebacks_are_refused_by_the_parser(argv, needle, capsys):
    assert run_cli([*argv, *POSITIONALS.get(argv[0], [])]) == 2
    one_line_error(capsys, argv[0], needle)


def test_a_huge_seed_in_a_sweep_spec_is_refused(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"seeds": [0, 10**30], "base": {"num_epochs": 1}}))
    assert run_cli(["sweep", str(spec), "--dry-run"]) == 2
    one_line_error(capsys, "sweep", str(spec), "seeds must be", "4294967295")
    spec.write_text(json.dumps({"seeds": [0], "base": {"num_epochs": 10**400}}))
    assert run_cli(["sweep", str(spec), "--dry-run"]) == 2
    one_line_error(capsys, "sweep", str(spec), "--num-epochs")


def test_a_sweep_name_that_cannot_name_a_directory_is_refused(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"name": "a\0b"}))  # was a ValueError from mkdir
    assert run_cli(["sweep", str(spec), "--dry-run"]) == 2
    one_line_error(capsys, "sweep", str(spec), "name 'a\\x00b' cannot name a directory")
    assert run_cli(["sweep", "--name", " ", "--set", "num_epochs=1", "--dry-run"]) == 2
    one_line_error(capsys, "sweep", "--name: empty")


def test_an_absurd_model_is_refused_before_it_is_built(capsys):
    assert run_cli(["train", "--model-name", "wrn_1000000_1000", *NO_DATA]) == 2
    one_line_error(capsys, "train", "--model-name", "at most 1000")
    assert run_cli(["train", "--model-name", "wrn_1000_1000", *NO_DATA]) == 2
    err = one_line_error(capsys, "train", "--model-name wrn_1000_1000")
    assert f"16,040,781,568,186 parameters, more than samkit builds ({MAX_PARAMETERS:,})" in err


@pytest.mark.parametrize(
    "name", ["resnet_small", "WideResnet28x10", "wrn_16_8", "pyramidnet_110_270", "Resnet152"]
)
def test_real_models_pass_the_size_check(name):
    assert config_from_values({"model_name": name}).model_name == name


def test_the_meta_count_is_the_real_count():
    kwargs = {"widths": [4, 8], "depths": [1, 1]}
    model = create_model("resnet_tiny", num_classes=10, in_channels=1, **kwargs)
    assert count_parameters("resnet_tiny", 10, 1, **kwargs) == sum(
        p.numel() for p in model.parameters()
    )
    assert count_parameters("WideResnet28x10") == 36_479_194
    with pytest.raises(ConfigError, match="unknown model 'nope'; known: "):
        config_from_values({"model_name": "nope"})


def test_a_landscape_grid_is_costed_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")  # the cost is refused before the run is even read
    assert run_cli(["landscape", missing, "--dims", "2", "--points", "1001"]) == 2
    one_line_error(
        capsys, "landscape", "--points 1001: a 2-D grid of 1001 x 1001 points", "1,002,001 loss"
    )
    assert run_cli(["landscape", missing, "--dims", "1", "--points", "1001"]) == 2
    one_line_error(capsys, "landscape", "no such")  # 1-D: fine, then the missing run


# --------------------------------------------------------------------------------------------
# Runs on disk: config.json fields, checkpoints of another model, Lanczos memory
# --------------------------------------------------------------------------------------------

KWARGS = {"widths": [4, 8], "depths": [1, 1]}  # resnet_tiny cut down to 1,382 parameters


def make_run(run: Path, data_dir: Path, model_kwargs: dict, **config) -> Path:
    """A run directory as samkit train writes it: config.json + one checkpoint."""
    torch.manual_seed(0)
    model = create_model("resnet_tiny", num_classes=10, in_channels=1, **model_kwargs)
    run.mkdir(parents=True)
    base = {
        "model_name": "resnet_tiny",
        "num_classes": 10,
        "in_channels": 1,
        "model_kwargs": model_kwargs,
        "dataset": "fashion_mnist",
        "data_dir": str(data_dir),
        "run_seed": 0,
    }
    (run / "config.json").write_text(json.dumps({**base, **config}))
    save_checkpoint({"model": model.state_dict(), "step": 1}, run / "checkpoints", 1)
    return run


@pytest.fixture
def run(tmp_path, fmnist_dir) -> Path:
    return make_run(tmp_path / "run", fmnist_dir, KWARGS)


def edit_config(run: Path, **fields) -> None:
    path = run / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"model_kwargs": [1, 2]}, "field 'model_kwargs' is [1, 2], expected an object"),
        ({"model_kwargs": {"widths": "abc"}}, "cannot build model 'resnet_tiny'"),
        ({"model_kwargs": {"colour": 1}}, "cannot build model 'resnet_tiny'"),
        # (a tensor of 9e12 entries: were the count to regress, the allocation fails at once)
        ({"model_kwargs": {**KWARGS, "widths": [10**6] * 2}}, "parameters, more than samkit"),
        ({"num_classes": "ten"}, "field 'num_classes' is 'ten', expected an integer"),
        ({"in_channels": 0}, "field 'in_channels' is 0"),
        ({"model_name": 5}, "field 'model_name' is 5"),
        ({"model_name": "resnet9000"}, "field 'model_name': unknown model 'resnet9000'"),
        ({"dataset": ["fashion_mnist"]}, "field 'dataset'"),
        ({"data_dir": 3}, "field 'data_dir'"),
    ],
)
@pytest.mark.parametrize("command", ["evaluate", "sharpness"])
def test_a_bad_config_field_is_one_line_naming_the_file(run, command, fields, needle, capsys):
    edit_config(run, **fields)
    assert run_cli([command, str(run)]) == 2
    one_line_error(capsys, command, str(run / "config.json"), needle)


@pytest.mark.parametrize(
    "field, value",
    [("threads", [1]), ("threads", 100000), ("run_seed", -1), ("batch_size", "x"),
     ("workers", 1.5), ("holdout_fraction", "x"), ("holdout_seed", "x"),
     ("compute_top_5_error_rate", "yes")],
)  # fmt: skip
def test_evaluate_checks_the_config_fields_of_the_data(run, field, value, capsys):
    edit_config(run, **{field: value})
    assert run_cli(["evaluate", str(run)]) == 2
    one_line_error(capsys, "evaluate", str(run / "config.json"), f"field {field!r}")


@pytest.mark.parametrize("command", ["evaluate", "hessian", "landscape"])
def test_a_checkpoint_of_another_model_is_one_line(tmp_path, fmnist_dir, command, capsys):
    other = make_run(tmp_path / "other", fmnist_dir, {"widths": [2], "depths": [1]})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((other / "config.json").read_text())
    edit_config(run, model_kwargs=KWARGS)  # the config of one model, the weights of another
    (run / "checkpoints").mkdir()
    (ckpt,) = (other / "checkpoints").iterdir()
    (run / "checkpoints" / ckpt.name).write_bytes(ckpt.read_bytes())
    assert run_cli([command, str(run)]) == 2
    err = one_line_error(
        capsys, command, f"{run / 'checkpoints' / ckpt.name}: weights do not fit model"
    )
    assert "missing key(s) ('layers.1." in err and "of another shape (" in err
    assert len(err) < 500


def test_a_checkpoint_entry_that_is_not_a_tensor_is_one_line(run, capsys):
    (ckpt,) = (run / "checkpoints").iterdir()
    state = torch.load(ckpt, weights_only=False)
    state["model"]["fc.weight"] = "abc"
    ckpt.unlink()
    save_checkpoint({"model": state["model"], "step": 2}, run / "checkpoints", 2)
    assert run_cli(["evaluate", str(run)]) == 2
    one_line_error(capsys, "evaluate", "weights do not fit", '"fc.weight", expected torch.Tensor')


def test_top_k_is_bounded_by_the_parameters(tmp_path, fmnist_dir, capsys):
    small = make_run(tmp_path / "small", fmnist_dir, {"widths": [1], "depths": [1]})
    assert run_cli(["hessian", str(small), "--top-k", "60", "--num-samples", "8"]) == 2
    one_line_error(capsys, "hessian", "--top-k 60: the model has only 53 parameters")


@pytest.mark.parametrize(
    "flags, needle",
    [
        ([], "--top-k 5: Lanczos keeps 55 vectors of the model's 1,382 parameters"),
        (["--max-steps", "20"], "--max-steps 20: Lanczos keeps 20 vectors"),
        (["--method", "power", "--density"], "--lanczos-steps 80: Lanczos keeps 80 vectors"),
    ],
)
def test_lanczos_must_fit_in_memory(run, monkeypatch, flags, needle, capsys):
    monkeypatch.setattr(limits, "device_memory", lambda device: 100_000)  # bytes
    assert run_cli(["hessian", str(run), "--num-samples", "8", *flags]) == 2
    one_line_error(capsys, "hessian", needle, "GiB), more than the 0.0 GiB of memory")


def test_the_machine_memory_is_known():
    memory = limits.device_memory(torch.device("cpu"))
    assert memory is not None and memory > 2**28


# --------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------


def test_an_idx_header_whose_shape_overflows_names_the_file(fmnist_dir, tmp_path, capsys):
    # 2**22 * 2**21 * 2**21 = 2**64: 0 in int64 arithmetic, which matched the empty payload
    path = fmnist_dir / "train-images-idx3-ubyte.gz"
    dims = (2**22, 2**21, 2**21)
    path.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 8, 3, *dims)))
    argv = ["train", "--data-dir", str(fmnist_dir), "--run-dir", str(tmp_path / "r")]
    assert run_cli([*argv, "--no-tensorboard", "--no-progress"]) == 2
    one_line_error(
        capsys,
        "train",
        f"{path}: truncated: header shape {dims} needs {math.prod(dims)} data bytes, found 0",
    )
