"""Shared fixtures: one intra-op thread per test, tiny Fashion-MNIST data sets (the writers are in
data_formats.py), empty default data locations, and two-process worker groups."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from data_formats import idx_bytes, write_fashion_mnist, write_idx


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Every test runs torch on one intra-op thread: the tests use tiny tensors, where thread
    hand-off dominates, and on a busy 2-core machine several OpenMP threads make ops 5-40x slower
    and erratic. Tests of ``--threads`` set their own value and check it is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def idx() -> SimpleNamespace:
    """The IDX writing helpers: ``idx.bytes``, ``idx.write``, ``idx.write_fashion_mnist``."""
    return SimpleNamespace(
        bytes=idx_bytes, write=write_idx, write_fashion_mnist=write_fashion_mnist
    )


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    """A directory with a tiny Fashion-MNIST (64 train / 32 test images)."""
    directory = tmp_path / "fmnist"
    write_fashion_mnist(directory)
    return directory


@pytest.fixture
def no_default_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make the default search locations empty temporary paths (and unset $SAMKIT_DATA), so
    that tests do not depend on whether the real data set is installed. Returns those paths."""
    from samkit.data import fashion_mnist

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SAMKIT_DATA", raising=False)
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(
        fashion_mnist, "DEFAULT_SEARCH_DIRS", ("~/.cache/samkit/fashion_mnist", str(system))
    )
    return [home / ".cache/samkit/fashion_mnist", system]


RUNNER = Path(__file__).with_name("_worker_runner.py")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def spawn_workers():
    """Run ``worker(rank)`` of the test file SCRIPT in ``world`` processes joined in a process
    group (``tests/_worker_runner.py``), bounded in time; return what each returned (saved to
    ``OUTDIR/rank{r}.pt``). A worker that fails or hangs fails the test (never hangs it)."""
    import os
    import subprocess
    import sys
    import time

    import torch

    def run(script: Path, outdir: Path, world: int = 2, timeout: float = 120.0) -> list:
        src = Path(__file__).resolve().parents[1] / "src"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env["OMP_NUM_THREADS"] = "1"
        port = _free_port()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(RUNNER),
                    str(script),
                    str(rank),
                    str(world),
                    str(port),
                    str(outdir),
                ],  # fmt: skip
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(world)
        ]
        deadline = time.monotonic() + timeout
        logs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                logs.append(out)
        except subprocess.TimeoutExpired:
            pytest.fail(f"workers of {script.name} did not finish within {timeout} s")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for rank, (p, log) in enumerate(zip(procs, logs)):
            assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log}"
        return [torch.load(Path(outdir) / f"rank{r}.pt") for r in range(world)]

    return run
