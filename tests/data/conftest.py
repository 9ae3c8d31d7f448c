"""The data-set writers as a fixture, and a fixture that empties the default data search
locations."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from data_formats import cifar_rows, write_cifar, write_image_folder, write_svhn_mat


@pytest.fixture
def writers() -> SimpleNamespace:
    return SimpleNamespace(
        cifar=write_cifar,
        cifar_rows=cifar_rows,
        svhn=write_svhn_mat,
        image_folder=write_image_folder,
    )


@pytest.fixture
def empty_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``$HOME`` at an empty directory and unset ``$SAMKIT_DATA`` so that the default
    search locations hold nothing; returns the fake home."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SAMKIT_DATA", raising=False)
    return home
