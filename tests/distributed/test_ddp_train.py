"""``torchrun --nproc_per_node 2 -m samkit train`` end to end: gloo on 127.0.0.1, one thread per
process, every launch under a hard timeout (the whole process group is killed on expiry).

* 2 processes x b images per step == one process with ``--sam-m b`` on the same global batch
  (per-replica perturbations), and ``--sync-perturbations`` == one process with plain SAM on the
  global batch. The model (resnet_tiny) has BatchNorm: in training mode it normalises with the
  statistics of each forward's batch, which is the same chunk of b images in both runs, so the
  weights agree; only the running statistics differ (each replica tracks its own chunks; rank 0's
  are checkpointed), and those are not compared.
* One set of outputs (only rank 0 writes), exact sharded evaluation (33 test images: a ragged
  17 / 16 split), resume of a killed job, and a rank that raises ends the job with an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from data_formats import write_fashion_mnist
from samkit.rundir import load_latest_checkpoint

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

SRC = Path(__file__).resolve().parents[2] / "src"
# samkit + test hooks + a model without BatchNorm
ENTRY = Path(__file__).resolve().parents[1] / "samkit_entry.py"
TIMEOUT = 150.0
COMMON = [
    "--model-name", "resnet_tiny",
    "--batch-size", "16",
    "--num-epochs", "2",
    "--threads", "1",
    "--no-progress",
    "--save-progress-seconds", "0",
    "--amp", "none",  # float32: the comparisons with one process are exact to 1e-6
]  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env.update(extra or {})
    return env


def _launch(
    args: list[str],
    nproc: int,
    hooks: list[str] = (),
    nobn: bool = False,
    stdout: Any = subprocess.PIPE,
) -> subprocess.Popen:
    target = [str(ENTRY), *hooks] if (nobn or hooks) else ["-m", "samkit"]
    if nproc == 1:
        cmd = [sys.executable, *target, "train", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc_per_node", str(nproc), "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            *target, "train", *args,
        ]  # fmt: skip
    return subprocess.Popen(
        cmd,
        env=_env(),
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killed as a whole
    )


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the job: torchrun's process group and its workers, which torch starts in sessions
    of their own (killing torchrun alone leaves them running, holding the run directory's lock);
    return once they have all exited."""
    workers = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while not all(_exited(pid) for pid in workers):  # SIGKILL cannot be ignored: not long
        time.sleep(0.01)


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        pytest.fail(f"the job did not finish within {timeout} s")
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    return proc.returncode, out


def train(run_dir: Path, data: Path, extra: list[str], nproc: int, **kw) -> str:
    """Run to completion (``extra`` may override COMMON's flags: argparse keeps the last)."""
    code, out = _finish(
        _launch([*COMMON, "--data-dir", str(data), "--run-dir", str(run_dir), *extra], nproc, **kw)
    )
    assert code == 0, out
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path, state = load_latest_checkpoint(run_dir / "checkpoints")
    return state["model"]


def max_param_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    keys = [k for k in wa if "running_" not in k and "num_batches" not in k]
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in keys)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ddp") / "fmnist"
    write_fashion_mnist(directory, n_train=64, n_test=33, seed=3)
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp_runs")
    out = {}
    nobn = ["--model-name", "nobn_cnn"]
    for name, extra, nproc in (
        ("ddp", [], 2),
        ("single_m8", ["--sam-m", "8"], 1),
        ("single", [], 1),
        ("nobn_ddp", nobn, 2),
        ("nobn_ddp_sync", [*nobn, "--sync-perturbations"], 2),
        ("nobn_single", nobn, 1),
    ):
        out[name] = root / name
        train(out[name], data, extra, nproc, nobn=name.startswith("nobn"))
    return out


def test_ddp_equals_m_sharpness_with_m_per_process_batch(runs):
    assert max_param_diff(runs["ddp"], runs["single_m8"]) < 1e-6
    # the comparison discriminates: one global perturbation gives other weights
    assert max_param_diff(runs["ddp"], runs["single"]) > 1e-5


def test_sync_perturbations_equals_global_batch_sam(runs):
    # Without BatchNorm (with it, each replica would normalise over its own 8 images, the
    # single process over all 16: a different function; --sync-bn needs CUDA devices).
    assert max_param_diff(runs["nobn_ddp_sync"], runs["nobn_single"]) < 1e-6
    assert max_param_diff(runs["nobn_ddp_sync"], runs["nobn_ddp"]) > 1e-5


#: SAF (its bank needs the logits of epoch e - 1, so from epoch 3 of 3) and MESA (from epoch 2)
TRAJECTORY = {
    "saf": ["--optimizer", "saf", "--trajectory-start-epoch", "1", "--saf-epochs-back", "1",
            "--num-epochs", "3"],
    "mesa": ["--optimizer", "mesa", "--trajectory-start-epoch", "1", "--mesa-ema-decay", "0.5"],
}  # fmt: skip


@pytest.mark.parametrize("method", list(TRAJECTORY))
def test_saf_and_mesa_under_torchrun_equal_one_process(method, data, tmp_path):
    """2 processes x 8 images == one process x 16 (no BatchNorm, plain SGD plus the trajectory
    term): every rank's SAF bank holds every sample's logits (each step gathers them from all
    ranks; without that the weights differ), and MESA's teacher is the same on every rank."""
    flags = ["--model-name", "nobn_cnn", *TRAJECTORY[method]]
    train(tmp_path / "ddp", data, flags, 2, nobn=True)
    train(tmp_path / "single", data, flags, 1, nobn=True)
    assert max_param_diff(tmp_path / "ddp", tmp_path / "single") < 1e-6
    # (that the term changes the weights: tests/train/test_trajectory_train.py, one process)
    if method == "saf":
        _, state = load_latest_checkpoint(tmp_path / "ddp" / "checkpoints")
        written = state["trajectory"]["written"]
        assert bool((written.max(dim=0).values >= 1).all())  # all 64 samples, not rank 0's 32


def test_only_rank_0_writes_and_evaluation_is_exact(runs):
    run = runs["ddp"]
    names = sorted(p.name for p in run.iterdir())
    assert [n for n in names if n.startswith("events.out.tfevents")].__len__() == 1
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= set(names)
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["images_trained"] == 2 * 64  # global batches, counted once
    state = load_latest_checkpoint(run / "checkpoints")[1]
    assert not any(k.startswith("module.") for k in state["model"])  # the unwrapped model

    # the sharded, all-reduced evaluation equals one process evaluating the checkpoint
    from samkit.train.evaluate import evaluate_run

    ref = evaluate_run(run, split="test", device="cpu", threads=1)
    assert metrics[-1]["test_error_rate"] == pytest.approx(ref["test_error_rate"], abs=1e-12)
    assert metrics[-1]["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)
    assert ref["num_examples"] == 33


def _launch_paused(run: Path, data: Path, marker: Path, step: int = 2) -> subprocess.Popen:
    """Start a 2-process job in ``run`` whose rank 0 pauses right after step ``step`` (before
    that step's checkpoint; rank 1 then waits in step ``step + 1``'s all-reduce) until it gets a
    stop signal; return it once the pause has begun (``marker`` exists). The caller stops it
    (the job is killed if waiting fails)."""
    args = [*COMMON, "--data-dir", str(data), "--run-dir", str(run)]
    proc = _launch(args, 2, hooks=["--pause-at", f"{step}:{marker}"])
    deadline = time.monotonic() + TIMEOUT  # only a hung job reaches it
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the job never reached its pause"
            time.sleep(0.1)
    except BaseException:
        _kill_group(proc)
        raise
    return proc


def test_resume_after_killing_the_job(runs, data, tmp_path):
    run = tmp_path / "killed"
    proc = _launch_paused(run, data, tmp_path / "paused")
    _kill_group(proc)  # SIGKILL torchrun and both workers mid-run, after step 2
    assert not (run / "summary.json").exists()
    assert load_latest_checkpoint(run / "checkpoints")[1]["global_step"] == 1
    out = train(run, data, [], 2)
    assert "resuming from" in out
    assert max_param_diff(run, runs["ddp"]) == 0.0
    w_a, w_b = weights(run), weights(runs["ddp"])
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a if "running_" not in k)


def test_a_rank_that_raises_ends_the_job(data, tmp_path):
    # (_finish's timeout, well below gloo's default of 30 minutes, is what "ends" means here.)
    code, out = _finish(
        _launch(
            [*COMMON, "--data-dir", str(data), "--run-dir", str(tmp_path / "r"),
             "--dist-timeout", "30"],
            2,
            hooks=["--fail-at", "1:3"],
        ),
        timeout=120,
    )  # fmt: skip
    assert code != 0
    assert "rank 1: RuntimeError" in out and "injected failure" in out


def test_batch_size_must_split_evenly(data, tmp_path):
    code, out = _finish(
        _launch(
            ["--data-dir", str(data), "--run-dir", str(tmp_path / "r"), "--batch-size", "15",
             "--model-name", "resnet_tiny", "--threads", "1"],
            2,
        ),
        timeout=120,
    )  # fmt: skip
    assert code != 0
    assert "--batch-size 15" in out and "multiple of 2" in out


def test_sync_perturbations_is_refused_with_esam(capsys):
    import torch.nn.functional as F
    from torch import nn

    from samkit.cli import main
    from samkit.optim import ESAM
    from samkit.train import SharpnessAwareStep

    net = nn.Linear(3, 2)
    esam = ESAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(ValueError, match="sync_perturbations"):
        SharpnessAwareStep(net, esam, F.cross_entropy, sync_perturbations=True)
    assert main(["train", "--optimizer", "esam", "--sync-perturbations"]) == 2
    assert "--sync-perturbations: not supported with --optimizer esam" in capsys.readouterr().err


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step_and_saves(runs, data, tmp_path):
    run = tmp_path / "terminated"
    proc = _launch_paused(run, data, tmp_path / "paused")
    try:
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
        code, out = _finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    assert code != 0
    assert out.count("interrupted by SIGTERM; checkpoint saved") == 1, out  # rank 0 only
    saved = load_latest_checkpoint(run / "checkpoints")[1]
    # rank 0 had the signal after step 2; the ranks agree on it in step 3's all-reduce
    assert saved["global_step"] == 3
    assert "samkit train: error" not in out  # no rank was left waiting in a collective
    out = train(run, data, [], 2)
    assert "resuming from" in out
    w_a, w_b = weights(run), weights(runs["ddp"])
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a if "running_" not in k)


def test_sync_bn_is_refused_on_the_cpu_under_torchrun(data, tmp_path):
    # torch.nn.SyncBatchNorm (and DDP with it) refuses CPU tensors; the job stops before the
    # process group is set up, with one line naming the flag.
    code, out = _finish(
        _launch([*COMMON, "--data-dir", str(data), "--run-dir", str(tmp_path / "r"), "--sync-bn"],
                2),
        timeout=120,
    )  # fmt: skip
    assert code != 0
    assert "samkit train: error: --sync-bn: torch.nn.SyncBatchNorm does not run on cpu" in out
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_sync_bn_in_one_process_has_no_effect_and_is_recorded(data, tmp_path):
    run = tmp_path / "one"
    out = train(run, data, ["--sync-bn", "--max-steps", "1"], 1)
    assert out.count("--sync-bn: no effect in a single process") == 1
    config = json.loads((run / "config.json").read_text())
    assert config["sync_bn"] is True and config["sync_bn_layers"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["sync_bn"] is True


def test_sync_bn_checkpoints_load_into_the_plain_model():
    # The checkpointed state_dict of a converted model has BatchNorm's keys, so samkit evaluate /
    # load_run_model (which rebuild the plain model) load it strictly.
    from samkit.models import create_model
    from samkit.train.distributed import convert_sync_batchnorm

    plain = create_model("resnet_tiny", num_classes=10, in_channels=1)
    torch.manual_seed(1)
    converted, count = convert_sync_batchnorm(create_model("resnet_tiny", 10, in_channels=1))
    assert count > 0
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == count
    state = converted.state_dict()
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize(
    "where",
    [
        "epoch_end",  # the last epoch's evaluation, in the training loop
        "max_steps",  # the partial epoch's evaluation after --max-steps, in the finish path
    ],
)
def test_sigterm_during_the_final_evaluation_stops_every_rank_cleanly(data, tmp_path, where):
    run = tmp_path / "terminated"
    log = tmp_path / "out.txt"
    args = [*COMMON, "--data-dir", str(data), "--run-dir", str(run), "--num-epochs", "1",
            "--dist-timeout", "60"]  # fmt: skip
    if where == "max_steps":
        args += ["--max-steps", "3"]
    # The hook: as its first evaluation starts, rank 0 sends SIGTERM to torchrun, which forwards
    # it to every worker, and waits until it has arrived.
    with log.open("w") as out_file:
        proc = _launch(args, 2, hooks=["--signal-in-eval", "SIGTERM:parent"], stdout=out_file)
    try:
        code, _ = _finish(proc)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    out = log.read_text()
    assert code != 0
    assert out.count("interrupted by SIGTERM; checkpoint saved") == 1, out  # rank 0 only
    assert "samkit train: error" not in out, out  # no rank failed in a collective
    assert "Connection closed" not in out and "ChildFailedError" not in out, out
    steps = 4 if where == "epoch_end" else 3
    saved = load_latest_checkpoint(run / "checkpoints")[1]
    assert saved["global_step"] == steps  # the finished training, saved
    assert not (run / "summary.json").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the epoch-end record was published before stopping; a partial one is only published by a
    # run that finishes
    assert [m["epoch"] for m in metrics] == ([1] if where == "epoch_end" else [])

    # rerunning finishes the run: only the evaluation and the summary are left to do
    out = train(run, data, args[len(COMMON) :], 2)
    assert "resuming from" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["status"] == (
        "completed" if where == "epoch_end" else "max_steps"
    )
