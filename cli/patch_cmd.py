"""`memedit patch ...`: make, apply, revert, show and compare value patches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import JsonOpt, ModelOpt, app, command, console, err_console, esc, load_model, print_json

patch_app = typer.Typer(help="Exact, reversible value-row patches: make, apply, revert, show, log, diff.",
                        no_args_is_help=True)
app.add_typer(patch_app, name="patch")

TableOpt = Annotated[str, typer.Option("--table", "-t", help='Value table: "shared", "layer4" or a layer index.')]
RowsOpt = Annotated[list[str], typer.Option("--rows", "-r", help="Row ids: 3,7,10-12 (repeatable).")]
ValuesOpt = Annotated[Optional[Path],
                      typer.Option("--values", help="New values: .npy or .safetensors, (n, V) or (V,).")]
ScalarOpt = Annotated[Optional[float],
                      typer.Option("--scalar", help="A number (set/add: the value, scale: the factor).")]
FromRowOpt = Annotated[Optional[int], typer.Option("--from-row", help="Use another row of the same table.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the patch file.")]
ApplyOpt = Annotated[bool, typer.Option("--apply", help="Apply the patch to the model folder now.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Apply even if the base rows or model differ (warns).")]
MessageOpt = Annotated[str, typer.Option("--message", help="A note stored with the patch.")]


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)


def layers_note(change: dict) -> str:
    """'shared table: layers 1, 3 change' style note naming every reading layer."""
    layers = ", ".join(map(str, change["layers"]))
    if len(change["layers"]) > 1:
        return f"table {change['table']} is read by layers {layers}: all of them change"
    return f"table {change['table']} (layer {layers})"


def show_patch(summary: dict, title: str) -> None:
    console.print(f"[bold]{title}[/] {summary['id']}  {summary['kind']}  {esc(summary['message'])}")
    t = Table()
    for c in ("table", "layers that change", "rows", "max |delta|"):
        t.add_column(c)
    for c in summary["tables"]:
        rows = c["rows"]
        shown = ", ".join(map(str, rows[:10])) + (f" ... ({len(rows)} rows)" if len(rows) > 10 else "")
        t.add_row(c["table"], ", ".join(map(str, c["layers"])), shown, f"{c['max_delta']:.4g}")
    console.print(t)
    for c in summary["tables"]:
        if len(c["layers"]) > 1:
            console.print(layers_note(c))


def _make(op: str, table: str, rows: list[str], values: Optional[Path], scalar: Optional[float],
          from_row: Optional[int], out: Optional[Path], apply: bool, message: str, model: Optional[str],
          json: bool) -> None:
    from memedit.editing import patch as P
    from memedit.storage.checkpoint import check_output

    m = load_model(model)
    if apply:
        from memedit.storage.checkpoint import require_writable

        require_writable(m)
    if out is not None:
        check_output(m, out)
    vals = P.load_values(values) if values is not None else None
    patch = P.row_patch(m, op, table, P.parse_rows(rows), values=vals, scalar=scalar, from_row=from_row,
                        message=message)
    if out is None and not apply:
        out = Path(f"patch-{patch.id}.safetensors")
    if out is not None:
        patch.save(out)
    if apply:
        P.apply(m, patch)
    res = patch.summary() | {"file": str(out) if out else None, "applied": apply}
    if json:
        return print_json(res)
    show_patch(res, "patch")
    if out is not None:
        console.print(f"wrote {out}")
    if apply:
        console.print(f"applied to {m.source}")


@command(patch_app, "set")
def set_(table: TableOpt, rows: RowsOpt, values: ValuesOpt = None, scalar: ScalarOpt = None,
         from_row: FromRowOpt = None, out: OutOpt = None, apply: ApplyOpt = False, message: MessageOpt = "",
         model: ModelOpt = None, json: JsonOpt = False) -> None:
    """Set rows to new values (from a file, a scalar, or another row).

    Example: memedit patch set -m ./my-model --table shared --rows 5,9 --values new.npy --apply
    """
    _make("set", table, rows, values, scalar, from_row, out, apply, message, model, json)


@command(patch_app, "add")
def add(table: TableOpt, rows: RowsOpt, values: ValuesOpt = None, scalar: ScalarOpt = None,
        from_row: FromRowOpt = None, out: OutOpt = None, apply: ApplyOpt = False, message: MessageOpt = "",
        model: ModelOpt = None, json: JsonOpt = False) -> None:
    """Add a delta to rows (from a file, a scalar, or another row).

    Example: memedit patch add -m ./my-model --table shared --rows 5 --scalar 0.1 --apply
    """
    _make("add", table, rows, values, scalar, from_row, out, apply, message, model, json)


@command(patch_app, "scale")
def scale(table: TableOpt, rows: RowsOpt, scalar: ScalarOpt = None, out: OutOpt = None, apply: ApplyOpt = False,
          message: MessageOpt = "", model: ModelOpt = None, json: JsonOpt = False) -> None:
    """Multiply rows by --scalar.

    Example: memedit patch scale -m ./my-model --table shared --rows 5-8 --scalar 0.5 --apply
    """
    _make("scale", table, rows, None, scalar, None, out, apply, message, model, json)


@command(patch_app, "zero")
def zero(table: TableOpt, rows: RowsOpt, out: OutOpt = None, apply: ApplyOpt = False, message: MessageOpt = "",
         model: ModelOpt = None, json: JsonOpt = False) -> None:
    """Set rows to zero (switch slots off).

    Example: memedit patch zero -m ./my-model --table shared --rows 5,9 --apply
    """
    _make("zero", table, rows, None, None, None, out, apply, message, model, json)


@command(patch_app, "copy")
def copy(table: TableOpt, rows: RowsOpt, from_row: Annotated[int, typer.Option("--from-row", help="Row to copy.")],
         out: OutOpt = None, apply: ApplyOpt = False, message: MessageOpt = "", model: ModelOpt = None,
         json: JsonOpt = False) -> None:
    """Copy one row into rows.

    Example: memedit patch copy -m ./my-model --table shared --rows 9 --from-row 5 --apply
    """
    _make("copy", table, rows, None, None, from_row, out, apply, message, model, json)


@command(patch_app, "apply")
def apply_(file: Annotated[Path, typer.Argument(help="A patch file.")], force: ForceOpt = False,
           model: ModelOpt = None, json: JsonOpt = False) -> None:
    """Apply a patch file to a model folder (atomically; logged; refused twice).

    Example: memedit patch apply patch-1a2b3c4d5e6f.safetensors -m ./my-model
    """
    from memedit.editing import patch as P

    m = load_model(model)
    p = P.Patch.load(file)
    warnings = P.apply(m, p, force=force)
    _warn(warnings)
    if json:
        return print_json(p.summary() | {"applied": True, "warnings": warnings})
    show_patch(p.summary(), "applied")


@command(patch_app, "revert")
def revert(ref: Annotated[str, typer.Argument(help="Patch id (from `patch log`) or patch file.")],
           force: ForceOpt = False, model: ModelOpt = None, json: JsonOpt = False) -> None:
    """Revert an applied patch: its rows return to their old bytes exactly.

    Example: memedit patch revert 1a2b3c4d5e6f -m ./my-model
    """
    from memedit.editing import patch as P

    m = load_model(model)
    p, warnings = P.revert(m, ref, force=force)
    _warn(warnings)
    if json:
        return print_json(p.summary() | {"reverted": True, "warnings": warnings})
    show_patch(p.summary(), "reverted")


@command(patch_app, "show")
def show(file: Annotated[Path, typer.Argument(help="A patch file.")], json: JsonOpt = False) -> None:
    """Show what a patch file changes.

    Example: memedit patch show patch-1a2b3c4d5e6f.safetensors
    """
    from memedit.editing.patch import Patch

    s = Patch.load(file).summary()
    if json:
        return print_json(s)
    show_patch(s, "patch")
    console.print(f"made {s['time']} on model {s['base']}")


@command(patch_app, "log")
def log(model: ModelOpt = None, json: JsonOpt = False) -> None:
    """The model's edit history: every applied and reverted patch, with ids.

    Example: memedit patch log -m ./my-model
    """
    from memedit.editing.patch import applied_ids
    from memedit.storage.state import edit_log

    m = load_model(model)
    entries = edit_log(m)
    applied = applied_ids(m)
    live = set(applied)
    if json:
        return print_json({"entries": entries, "applied": applied})
    if not entries:
        console.print("no edits yet")
        return
    t = Table(title=f"edit log of {m.source}")
    for c in ("time", "op", "id", "kind", "tables (rows)", "layers", "message", "applied now"):
        t.add_column(c)
    for e in entries:
        t.add_row(e.get("time", ""), e.get("op", ""), e.get("id", ""), e.get("kind", ""),
                  ", ".join(f"{k} ({v})" for k, v in e.get("tables", {}).items()),
                  ", ".join(map(str, e.get("layers", []))), e.get("message", ""), "yes" if e.get("id") in live else "")
    console.print(t)


@command(patch_app, "diff")
def diff(model_a: Annotated[str, typer.Argument(help="First model.")],
         model_b: Annotated[str, typer.Argument(help="Second model.")], json: JsonOpt = False) -> None:
    """Value rows that differ between two models, with max |delta| (and any other tensor that differs).

    Example: memedit patch diff ./my-model ./my-model-edited
    """
    from memedit.editing.patch import diff as run

    d = run(load_model(model_a), load_model(model_b))
    if json:
        return print_json(d)
    if d["identical"]:
        console.print("the models are identical")
        return
    t = Table()
    for c in ("table", "layers", "rows that differ", "max |delta|"):
        t.add_column(c)
    for x in d["tables"]:
        rows = ", ".join(map(str, x["rows"][:10])) + (" ..." if x["n_rows"] > 10 else "")
        t.add_row(x["table"], ", ".join(map(str, x["layers"])), f"{x['n_rows']}: {rows}" if x["n_rows"] else "0",
                  f"{x['max_delta']:.4g}")
    console.print(t)
    for o in d["other_tensors"]:
        console.print(f"{o['name']} differs (max |delta| {o['max_delta']:.4g})")
