"""Every committed sweep spec under experiments/ expands into cells samkit train accepts."""

from pathlib import Path

import pytest

from samkit.sweep.spec import check_spec, load_spec

SPECS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.toml"))


def test_there_are_specs():
    assert len(SPECS) >= 7


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_is_valid(path):
    spec = load_spec(path)
    check_spec(spec)  # SpecError naming the cell and the setting otherwise
    assert spec.name == path.stem
    assert f"samkit sweep experiments/{path.name}" in path.read_text()  # how to rerun it
