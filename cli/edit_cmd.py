"""Editing commands: `patch ...` (patch_cmd.py), `freeze`/`unfreeze`/`frozen`, `background`, `edit`."""

from __future__ import annotations

from . import patch_cmd  # noqa: F401  (registers the `patch` group)
