"""What every command shares: the --model option, loading, JSON and table output, one-line errors.

Nothing here imports torch at module level: ``memedit --help`` must stay instant.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

class OneLineErrors(TyperGroup):
    """The root command: a usage error (an unknown command, a missing option, a value click refuses, such as
    --steps 0 or --scalar abc) is one line and exit code 2, like every other user error, not click's box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            if not standalone_mode:
                raise
            err_console.print("aborted")
            sys.exit(1)
        except typer.TyperException as e:  # click's ClickException, as vendored by typer
            if not standalone_mode or not hasattr(e, "format_message"):
                raise
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                ctx = getattr(e, "ctx", None)
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None and ctx.command_path else ""
                err_console.print(f"[bold red]error:[/] {_escape(e.format_message() + hint)}", soft_wrap=True)
            sys.exit(getattr(e, "exit_code", 2))
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)  # non-standalone main returns an Exit's code, else None


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(" ".join(str(text).split()))  # one line, whatever click's message held


# The typer app lives here, not in app.py, so that command modules register on it without importing app.py
# (which imports them): no import cycle.
app = typer.Typer(
    name="memedit",
    cls=OneLineErrors,
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


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m", envvar="MEMEDIT_MODEL", show_envvar=True,
        help="Model folder or checkpoint (default: the bundled demo model).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
TokenizerOpt = Annotated[
    Optional[str],
    typer.Option(
        "--tokenizer", envvar="MEMEDIT_TOKENIZER", show_envvar=True,
        help="Tokenizer file to use (SentencePiece .model, tiktoken file, tokenizer.json); default: the model's own.",
    ),
]
DtypeOpt = Annotated[
    Optional[str], typer.Option("--dtype", help="Compute dtype: float32 or bfloat16 (default: as stored).")
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", envvar="MEMEDIT_DEVICE", show_envvar=True,
                 help="torch device to run the model on: cpu (default), cuda, cuda:1 ..."),
]


def esc(text: str) -> str:
    """User text (prompts, tokens, targets) made safe to print with rich: markup such as [/b] shows literally."""
    from rich.markup import escape

    return escape(str(text))


def fail(message: str) -> None:
    """Print a one-line error and exit with code 2."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # messages may hold [brackets]
    raise typer.Exit(2)


def user_errors(fn: Callable) -> Callable:
    """Turn the library's MemeditError (and a bad path) into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from memedit.errors import MemeditError

        try:
            return fn(*args, **kwargs)
        except MemeditError as e:
            fail(str(e))
        except OSError as e:  # a disk full, a permission, a vanished file: one line, never a traceback
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            fail(f"{e.strerror or e}{where}")
        except MemoryError:
            fail("out of memory: the request is too large for this machine")
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def command(app: typer.Typer, name: str | None = None, **kw) -> Callable:
    """Register ``fn`` as a command of ``app`` with user-error handling."""

    def deco(fn: Callable) -> Callable:
        return app.command(name, **kw)(user_errors(fn))

    return deco


SMALL_MODEL = 50_000_000  # parameters


def load_model(model: Optional[str], dtype: Optional[str] = None, tokenizer: Optional[str] = None,
               device: Optional[str] = None, **options: Any):
    """Load --model on --device; a tokenizer comes from --tokenizer, else $MEMEDIT_TOKENIZER (so every command
    honours it)."""
    import os

    import torch

    import memedit

    tokenizer = tokenizer or os.environ.get("MEMEDIT_TOKENIZER")
    if tokenizer:
        options["tokenizer"] = tokenizer
    m = memedit.load(model, dtype=dtype, device=device, **options)
    if sum(p.numel() for p in m.parameters()) < SMALL_MODEL and "OMP_NUM_THREADS" not in os.environ:
        # A command on a small model runs many tiny batches: a second thread only waits for the first, and on a
        # busy machine a spinning thread pool made commands 5-50x slower. Big models keep torch's default.
        torch.set_num_threads(1)
    return m


class StepProgress:
    """A rich progress bar on stderr that the library calls as progress(done, total); a no-op when disabled (--json).

    Usage: ``with StepProgress("exporting", "slots", disable=json) as bar: run(..., progress=bar)``.
    """

    def __init__(self, label: str, unit: str, disable: bool = False):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn(esc(label)), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=disable,
                            transient=True)
        self.task = self.bar.add_task(label, total=None)

    def __enter__(self) -> StepProgress:
        self.bar.__enter__()
        return self

    def __call__(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")
