"""report: a static, browsable site of the memory — audit figures, slot pages, traced facts, the edit log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    app,
    command,
    console,
    err_console,
    fail,
    load_model,
    print_json,
)


@command(app)
def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write (replaces a previous report).")],
    stats: Annotated[Optional[Path], typer.Option("--stats", help="An audit file (audit --out, with --contexts M for "
                                                                  "top contexts).")] = None,
    fact: Annotated[Optional[list[str]], typer.Option("--fact", help="Trace this fact of the model's world "
                                                                     "(repeatable).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="Trace this prompt (repeatable).")] = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", help="The target of each --prompt, in order.")
                      ] = None,
    n: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Promoted and suppressed tokens per slot.")] = 5,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json: JsonOpt = False,
) -> None:
    """Write a static report site that opens from file:// (no server): the audit's figures and metrics, a search box,
    a page per slot (generated in the browser from data files), a page per traced fact or prompt, the edit log.

    Example: memedit audit --out audit.h5 --contexts 8 && memedit report --out site --stats audit.h5 --fact f00000
    """
    from memedit.auditing.hdf5 import read_audit
    from memedit.auditing.report import build_report

    prompts, targets = list(prompt or []), list(target or [])
    if targets and len(targets) != len(prompts):
        fail(f"give one --target per --prompt ({len(prompts)} prompts, {len(targets)} targets), or none")
    audit_stats = read_audit(stats) if stats is not None else None
    m = load_model(model, dtype, device=device)
    say = None if json else (lambda s: err_console.print(f"[dim]{s}[/]"))
    summary = build_report(m, out, audit_stats, list(fact or []),
                           list(zip(prompts, targets or [None] * len(prompts), strict=True)), n, say)
    if json:
        return print_json(summary)
    console.print(f"wrote {summary['out']}: {summary['slots']:,} slots ({summary['bytes_per_slot']:.0f} bytes each), "
                  f"{summary['pages']} traced pages, {summary['edits']} edits, {summary['seconds']:.1f} s; "
                  f"open {Path(summary['out']).resolve() / 'index.html'}")
