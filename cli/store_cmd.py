"""`memedit check` and `memedit compact`: verify, repair and upgrade a model folder; fold its row log."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import JsonOpt, ModelOpt, app, command, console, load_model, print_json


@command(app)
def check(
    upgrade: Annotated[bool, typer.Option("--upgrade", help="Move an edit log written by an earlier memedit into "
                                                            "the row log.")] = False,
    model: ModelOpt = None,
    json: JsonOpt = False,
) -> None:
    """Verify a model folder (config, weights, row log against the weights, frozen set, fingerprint), repair what
    can be repaired (a torn last record, temp files of interrupted writes) and say exactly what is wrong otherwise.

    Example: memedit check --model ./my-model
    """
    from memedit.errors import MemeditError
    from memedit.storage.checkpoint import resolve_model_path
    from memedit.storage.store import check_folder

    res = check_folder(resolve_model_path(model), repair=True, upgrade=upgrade)
    if json:
        print_json(res)
    else:
        for r in res["repaired"]:
            console.print(f"repaired: {r}")
        for p in res["problems"]:
            console.print(f"[red]problem:[/] {p}", soft_wrap=True)
        console.print(f"{res['folder']}: {res['records']} row-log records ({res['folded']} in the base), fingerprint "
                      f"{res['fingerprint']}: {'ok' if res['ok'] else 'NOT ok'}")
    if not res["ok"]:
        raise MemeditError(f"{res['folder']} has {len(res['problems'])} problem(s): {res['problems'][0]}")


@command(app)
def compact(model: ModelOpt = None, json: JsonOpt = False) -> None:
    """Fold the row log into a new base weights file (atomic rename; the history and `patch revert` stay).

    Example: memedit compact --model ./my-model
    """
    from memedit.storage.store import compact as run

    res = run(load_model(model))
    if json:
        return print_json(res)
    console.print(f"folded {res['records']} records into a new model.safetensors ({res['bytes']:,} bytes)")
