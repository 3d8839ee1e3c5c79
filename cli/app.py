"""The memedit command: imports every command module, each of which registers its commands on ``common.app``."""

from __future__ import annotations

from .common import app

# Command modules, in the order --help lists them (each registers its commands on `app`).
# isort: off
from . import core  # noqa: E402,F401
from . import inspect_cmd  # noqa: E402,F401
from . import edit_cmd  # noqa: E402,F401
from . import verify  # noqa: E402,F401
from . import keys  # noqa: E402,F401
from . import audit  # noqa: E402,F401
from . import store_cmd  # noqa: E402,F401
from . import slot  # noqa: E402,F401
from . import report  # noqa: E402,F401
# isort: on


def main() -> None:
    app()
