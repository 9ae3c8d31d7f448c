"""Sweeps: a grid of ``samkit train`` settings times seeds, each cell an ordinary run directory;
run on this machine (:func:`run_cells`) or as cluster jobs through submitit (:func:`submit_cells`).
``samkit report`` aggregates the result."""

from samkit.sweep.cluster import submit_cells
from samkit.sweep.runner import MANIFEST, CellResult, is_finished, run_cells, write_manifest
from samkit.sweep.spec import Cell, SpecError, SweepSpec, load_spec

__all__ = [
    "MANIFEST",
    "Cell",
    "CellResult",
    "SpecError",
    "SweepSpec",
    "is_finished",
    "load_spec",
    "run_cells",
    "submit_cells",
    "write_manifest",
]
