"""One rank of a multi-process test, started by the ``spawn_workers`` fixture (tests/conftest.py):

    python tests/_worker_runner.py TEST_FILE RANK WORLD PORT OUTDIR

Joins a process group over TCP on 127.0.0.1 (gloo, or what the test module's optional
``worker_backend(rank)`` returns after choosing this rank's device), runs the module's
``worker(rank)`` on one thread, saves its result to ``OUTDIR/rank{RANK}.pt``, waits for every rank
and leaves without the process group's C++ teardown (which races with the other ranks' exits, see
``samkit.train.distributed.exit_without_teardown``). A worker that raises prints its traceback
and exits nonzero, which fails the test.
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from samkit.train.distributed import exit_without_teardown


def main(test_file: str, rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location(Path(test_file).stem, test_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backend = getattr(module, "worker_backend", lambda rank: "gloo")(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        result = module.worker(rank)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_without_teardown(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
