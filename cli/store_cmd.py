"""`memedit check` and `memedit compact`: verify, repair and upgrade a model folder; fold its row log."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import JsonOpt, ModelOpt, app, command, console, esc, load_model, print_json


@command(app)
def check(
    upgrade: Annotated[bool, typer.Option("--upgrade", help="Move an edit log written by an earlier memedit into "
                                                            "the row log.")] = False,
    salvage: Annotated[bool, typer.Option("--salvage", help="Rebuild a damaged row log: keep the damaged file aside, "
                                                            "keep every valid record, rebuild damaged ones from their "
                                                            "patch files, and list what is lost.")] = False,
    model: ModelOpt = None,
    json: JsonOpt = False,
) -> None:
    """Verify a model folder (config, weights, row log against the weights, frozen set, background statistics,
    tokenizer, fingerprint), repair what can be repaired (a torn last record, temp files of interrupted writes) and
    list every problem otherwise. Exit 0: the folder is sound; 1: problems found (or records lost); 2: bad input.

    Example: memedit check --model ./my-model   (then, for a damaged row log: memedit check --salvage --model ...)
    """
    from memedit.storage.checkpoint import resolve_model_path
    from memedit.storage.check import check_folder

    res = check_folder(resolve_model_path(model), repair=True, upgrade=upgrade, salvage=salvage)
    if json:
        print_json(res)
    else:
        for r in res["repaired"]:
            console.print(f"repaired: {esc(r)}", soft_wrap=True)
        for r in res["lost"]:
            console.print(f"[red]lost:[/] {esc(r)}", soft_wrap=True)
        for p in res["problems"]:
            console.print(f"[red]problem:[/] {esc(p)}", soft_wrap=True)
        fp = f", fingerprint {res['fingerprint']}" if res["fingerprint"] else ""
        console.print(f"{esc(res['folder'])}: {res['records']} row-log records ({res['folded']} in the base){fp}: "
                      f"{'ok' if res['ok'] else 'NOT ok'}", soft_wrap=True)
    if not res["ok"]:
        raise typer.Exit(1)


@command(app)
def compact(model: ModelOpt = None, json: JsonOpt = False,
            native: Annotated[bool, typer.Option("--native", help="On a folder made by `convert --link`: write a "
                                                 "native model.safetensors (a full copy of the weights) and drop "
                                                 "the link.")] = False) -> None:
    """Fold the row log into a new base weights file (atomic rename; the history and `patch revert` stay).

    Example: memedit compact --model ./my-model
    """
    from memedit.storage.store import compact as run

    res = run(load_model(model), native=native)
    if json:
        return print_json(res)
    console.print(f"folded {res['records']} records into a new model.safetensors ({res['bytes']:,} bytes)")
