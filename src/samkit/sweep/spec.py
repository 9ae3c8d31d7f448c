"""A sweep's specification: a grid of ``samkit train`` settings times seeds, and its cells.

A spec file (TOML, JSON, or YAML when PyYAML is installed) names ``samkit train`` settings by
their :class:`~samkit.train.config.TrainConfig` field names::

    name = "label_noise"            # default: the file's name
    seeds = [0, 1, 2]
    [base]                          # settings of every cell
    num_epochs = 4
    [[variants]]                    # named sets of settings (default: one, named "run")
    name = "sgd"
    optimizer = "sgd"
    [[variants]]
    name = "sam"
    optimizer = "sam"
    [grid]                          # every combination of these values, for every variant
    label_noise = [0.2, 0.4]
    [report]                        # passed on to samkit report
    baseline = "sgd"

The cells are variants x grid combinations x seeds; a cell's name is its variant and grid values,
``sam-label_noise=0.4``, and its run directory ``SWEEP_DIR/<name>/seed_<seed>``. Every cell is
checked with ``samkit train``'s own checks (:mod:`samkit.train.checks`) before anything runs.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samkit.train.checks import config_from_values
from samkit.train.config import TrainConfig, settings
from samkit.train.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the tomli backport, if installed
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

__all__ = ["Cell", "SpecError", "SweepSpec", "load_spec", "train_argv"]

#: Settings a sweep sets itself for every cell.
RESERVED = frozenset({"run_seed", "run_dir", "output_dir", "resume", "progress"})


class SpecError(ValueError):
    """A spec that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: a name (variant and grid values), a seed and its settings."""

    name: str
    variant: str
    seed: int
    flags: dict[str, Any]  # every setting given to samkit train (besides seed and run dir)
    varying: dict[str, Any]  # what tells this cell's group from the others: variant, grid values

    @property
    def run_dir(self) -> str:
        """Relative to the sweep directory."""
        return f"{self.name}/seed_{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell": self.name,
            "variant": self.variant,
            "seed": self.seed,
            "flags": self.flags,
            "varying": self.varying,
            "run_dir": self.run_dir,
        }


@dataclass
class SweepSpec:
    name: str
    seeds: list[int]
    base: dict[str, Any] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)  # each with a "name"
    grid: dict[str, list[Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    source: str = "<command line>"

    def cells(self) -> list[Cell]:
        """Every cell, variants first, then grid combinations (in the spec's order), then seeds."""
        variants = self.variants or [{"name": "run"}]
        keys = list(self.grid)
        out = []
        for variant in variants:
            vname = str(variant["name"])
            own = {k: v for k, v in variant.items() if k != "name"}
            for values in itertools.product(*(self.grid[k] for k in keys)):
                point = dict(zip(keys, values))
                parts = ([vname] if len(variants) > 1 or not keys else []) + [
                    f"{k}={_text(v)}" for k, v in point.items()
                ]
                name = "-".join(parts)
                flags = {**self.base, **own, **point}
                varying = {"variant": vname, **point}
                out.extend(
                    Cell(name, vname, seed, _for_seed(flags, seed), varying) for seed in self.seeds
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seeds": self.seeds,
            "base": self.base,
            "variants": self.variants,
            "grid": self.grid,
            "report": self.report,
        }


def _for_seed(flags: dict[str, Any], seed: int) -> dict[str, Any]:
    """``{seed}`` in a text setting is the cell's seed: a run directory per seed, e.g.
    ``bootstrap_from = "sweeps/noise/sam/seed_{seed}"``."""
    return {
        k: v.replace("{seed}", str(seed)) if isinstance(v, str) else v for k, v in flags.items()
    }


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def train_argv(flags: dict[str, Any]) -> list[str]:
    """``samkit train`` arguments for ``flags``: ``--name value`` (booleans as true / false,
    None left out so the default applies)."""
    argv: list[str] = []
    for key, value in flags.items():
        if value is None:
            continue
        argv += [f"--{key.replace('_', '-')}", _text(value)]
    return argv


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror or exc})") from None
    try:
        if path.suffix == ".toml":
            if tomllib is None:
                raise SpecError(f"{path}: TOML specs need Python 3.11 (or tomli); use JSON")
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:  # optional: only YAML specs need PyYAML
                import yaml
            except ImportError:
                raise SpecError(f"{path}: YAML specs need PyYAML (pip install pyyaml)") from None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise SpecError(f"{path}: not valid YAML ({exc})") from None
        else:
            raise SpecError(f"{path}: a spec is a .toml, .json or .yaml file")
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not valid JSON ({exc})") from None
    except ValueError as exc:  # tomllib's errors derive from it
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"{path}: not valid {path.suffix[1:].upper()} ({exc})") from None
        raise SpecError(f"{path}: not valid {path.suffix[1:].upper()} ({exc})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a table / object at the top")
    return data


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a spec file (see the module docstring)."""
    path = Path(path)
    data = _read(path)
    unknown = sorted(set(data) - {"name", "seeds", "base", "variants", "grid", "report"})
    if unknown:
        raise SpecError(
            f"{path}: unknown key {unknown[0]!r} (a spec has name, seeds, base, variants, grid, "
            "report)"
        )
    name = str(data.get("name", path.stem))
    problem = directory_name_problem(name)  # the sweep's directory is sweeps/NAME
    if problem:
        raise SpecError(f"{path}: name {name!r} cannot name a directory ({problem})")
    spec = SweepSpec(
        name=name,
        seeds=data.get("seeds", [0]),
        base=data.get("base", {}),
        variants=data.get("variants", []),
        grid=data.get("grid", {}),
        report=data.get("report", {}),
        source=str(path),
    )
    check_spec(spec)
    return spec


_FIELDS = {f.name: f for f in settings() if f.setting.is_flag}


def _check_settings(where: str, values: Any) -> None:
    if not isinstance(values, dict):
        raise SpecError(f"{where}: expected a table of samkit train settings")
    for key, value in values.items():
        if key in RESERVED:
            raise SpecError(f"{where}: {key!r} is set by the sweep for every cell")
        if key not in _FIELDS:
            raise SpecError(
                f"{where}: {key!r} is not a samkit train setting (use the flag's name with "
                "underscores, e.g. num_epochs)"
            )
        if isinstance(value, dict | list):
            raise SpecError(f"{where}: {key} must be one value, not {type(value).__name__}")


def directory_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one directory inside the sweep's (None: it can). A name never
    leads outside: no separators, no ``..``."""
    if not name.strip():
        return "empty"
    if "\0" in name:
        return "a NUL byte"
    if "/" in name or "\\" in name:
        return "a path separator"
    if name in (".", ".."):
        return "'.' and '..' name no directory of their own"
    return None


def check_spec(spec: SweepSpec) -> None:
    """Raise :class:`SpecError` for anything that would make a cell fail before it trains."""
    src = spec.source
    seeds = spec.seeds
    seed_domain = next(f.setting.domain for f in settings() if f.name == "run_seed")
    assert seed_domain is not None and seed_domain.high is not None
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
        or not all(seed_domain.contains(s) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise SpecError(
            f"{src}: seeds must be a list of distinct non-negative integers, at most "
            f"{int(seed_domain.high)} (--run-seed)"
        )
    _check_settings(f"{src}: [base]", spec.base)
    if not isinstance(spec.variants, list):
        raise SpecError(f"{src}: variants must be a list of tables, each with a name")
    names = []
    for i, variant in enumerate(spec.variants):
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
            raise SpecError(f"{src}: variant {i + 1} needs a name")
        names.append(variant["name"])
        _check_settings(
            f"{src}: variant {variant['name']!r}",
            {k: v for k, v in variant.items() if k != "name"},
        )
    if len(set(names)) != len(names):
        raise SpecError(f"{src}: two variants share a name")
    if not isinstance(spec.grid, dict):
        raise SpecError(f"{src}: grid must be a table of lists")
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{src}: [grid] {key} must be a non-empty list of values")
        for value in values:
            _check_settings(f"{src}: [grid]", {key: value})
    if not isinstance(spec.report, dict):
        raise SpecError(f"{src}: report must be a table")
    for cell in _distinct_settings(spec.cells()):
        problem = directory_name_problem(cell.name)
        if problem:
            raise SpecError(
                f"{src}: cell {cell.name!r} cannot name a directory ({problem}): variant names "
                "and grid values name the cells' directories"
            )
        check_cell(cell, src)


def _distinct_settings(cells: Iterable[Cell]) -> list[Cell]:
    """One cell per name and settings: the seeds of a cell differ only in ``--run-seed``,
    unless a setting names ``{seed}``."""
    seen, out = set(), []
    for cell in cells:
        key = (cell.name, repr(sorted(cell.flags.items())))
        if key not in seen:
            seen.add(key)
            out.append(cell)
    return out


def check_cell(cell: Cell, where: str) -> TrainConfig:
    """The cell's settings through samkit train's own checks."""
    try:
        return config_from_values({**cell.flags, "run_seed": cell.seed})
    except ConfigError as exc:
        raise SpecError(f"{where}: cell {cell.name}: {exc}") from None
