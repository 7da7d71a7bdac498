"""The cache package's public surface is exactly its `__all__`."""

from __future__ import annotations

import service.cache


def test_every_exported_name_exists() -> None:
    """Each name in `service.cache.__all__` resolves, and the list is sorted and unique."""
    names = service.cache.__all__
    assert all(hasattr(service.cache, name) for name in names)
    assert list(names) == sorted(set(names))
