"""The typer app. Each command group lives in its own module and registers itself on ``app``."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="memedit",
    help="Look inside, and change, the memory layers of a language model.\n\n"
    "Every command takes --model (default: the bundled demo model; env MEMEDIT_MODEL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Command modules (import order is the order in --help).
from . import (  # noqa: E402
    audit,  # noqa: E402,F401
    core,  # noqa: E402,F401
    edit_cmd,  # noqa: E402,F401
    inspect_cmd,  # noqa: E402,F401
    keys,  # noqa: E402,F401
    verify,  # noqa: E402,F401
)


def main() -> None:
    app()
