"""The installed samkit's version (a leaf module: it imports nothing from samkit)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def samkit_version() -> str:
    """The version of the installed ``samkit`` distribution; "unknown" from a bare source tree."""
    try:
        return version("samkit")
    except PackageNotFoundError:
        return "unknown"
