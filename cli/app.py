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

@app.callback()
def _options(no_wait: bool = typer.Option(False, "--no-wait", help="If another memedit is writing the model "
                                                                    "folder, fail at once (exit 2) instead of "
                                                                    "waiting.")) -> None:
    import os

    if no_wait:
        os.environ["MEMEDIT_NO_WAIT"] = "1"


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
