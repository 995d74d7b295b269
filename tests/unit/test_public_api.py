"""unbroken.__all__ is sorted and complete, and every name in it exists."""

from __future__ import annotations

import unbroken
import unbroken.core


def isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical."""
    if name.isupper():
        return (0, name)
    return (1, name) if name[0].isupper() else (2, name)


def test_all_is_sorted_and_exists() -> None:
    """__all__ is sorted and each name resolves."""
    for module in (unbroken, unbroken.core):
        assert module.__all__ == sorted(module.__all__, key=isort_key)
        for name in module.__all__:
            assert hasattr(module, name), name


def test_all_is_complete() -> None:
    """Every public name defined in the package root is listed in __all__."""
    public = {n for n in vars(unbroken) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(unbroken.__all__)
