"""Checks of option values at the command line, before a model is loaded: the caps and rules of memedit/limits.py
as typer callbacks, so a refusal is one line (exit 2) that names the flag, and --help states the cap."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import typer


def finite(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False) -> Callable:
    """A callback refusing NaN, inf and numbers outside [lo, hi] ((lo, hi] with ``lo_open``)."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
        if value is None:
            return value
        from memedit.errors import MemeditError
        from memedit.limits import number

        try:
            return number(value, param.opts[0] if param.opts else param.name, lo, hi, lo_open)
        except MemeditError as e:
            raise typer.BadParameter(str(e)) from None

    return check


def cap(n: int) -> str:
    """A cap as --help states it: 'at most 100,000'."""
    return f"at most {n:,}"
