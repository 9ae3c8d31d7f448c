"""Every committed sweep spec under experiments/ expands into cells samkit train accepts."""

from pathlib import Path

import pytest

from samkit.sweep.spec import check_spec, load_spec

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SPECS = sorted(EXPERIMENTS.glob("*.toml"))


def test_there_are_specs():
    assert len(SPECS) >= 7


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_is_valid(path):
    spec = load_spec(path)
    # A second stage relabels from a first stage's runs (their checkpoints are not committed):
    # the path must be that committed spec's output; the rest is checked as for any spec.
    source = spec.base.pop("bootstrap_from", None)
    if source is not None:
        parts = source.split("/")
        assert parts[:2] == ["experiments", "results"] and parts[-1] == "seed_{seed}"
        assert (EXPERIMENTS / f"{parts[2]}.toml").is_file()
    check_spec(spec)  # SpecError naming the cell and the setting otherwise
    assert spec.name == path.stem
    assert f"samkit sweep experiments/{path.name}" in path.read_text()  # how to rerun it
