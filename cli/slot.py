"""slot: everything about one slot — sub-keys, what it writes, usage and top contexts, frozen state, edits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import JsonOpt, ModelOpt, app, command, console, esc, print_json


@command(app)
def slot(
    slot_id: Annotated[int, typer.Argument(help="The slot id (i * N + j).", metavar="ID", show_default=False)],
    stats: Annotated[Optional[Path], typer.Option("--stats", help="An audit file (audit --out; --contexts M for "
                                                                  "top contexts).")] = None,
    table: Annotated[Optional[str], typer.Option("--table", help="Value table (needed when each layer has one).")
                     ] = None,
    n: Annotated[int, typer.Option("--tokens", "-n", min=1, help="Promoted and suppressed tokens to list.")] = 8,
    model: ModelOpt = None,
    json: JsonOpt = False,
) -> None:
    """What is this slot? Its sub-keys (i, j) per head and their norms, value-row norm, the tokens it promotes and
    suppresses (the position-independent readout), usage and top contexts from an audit, frozen state and edits.

    Example: memedit audit --out audit.h5 --contexts 8 && memedit slot 1234 --stats audit.h5
    """
    from memedit.auditing.slot import slot_info
    from memedit.storage.checkpoint import is_native, resolve_model_path

    path = resolve_model_path(model)
    if path.is_dir() and is_native(path):  # read only the tensors this slot needs
        src = path
    else:
        from .common import load_model

        src = load_model(model)
    d = slot_info(src, slot_id, table, stats, n)
    if json:
        return print_json(d)
    console.print(f"[bold]slot {d['slot']}[/] of table {d['table']} (read by layers "
                  f"{', '.join(map(str, d['layers']))}): sub-keys i={d['i']}, j={d['j']}; value-row norm "
                  f"{d['value_norm']:.3f}; {'[cyan]frozen[/]' if d['frozen'] else 'not frozen'}")
    kt = Table(title="sub-key norms (first half i / second half j)", box=None, padding=(0, 2))
    kt.add_column("layer")
    heads = d["sub_keys"][0]["heads"]
    for h in heads:
        kt.add_column(f"head {h['head']}", justify="right")
    for k in d["sub_keys"]:
        kt.add_row(str(k["layer"]), *(f"{h['i_norm']:.2f} / {h['j_norm']:.2f}" for h in k["heads"]))
    console.print(kt)
    for wr in d["writes"]:
        up = ", ".join(f"{esc(repr(x['token']))} {x['logit']:+.2f}" for x in wr["promotes"])
        down = ", ".join(f"{esc(repr(x['token']))} {x['logit']:+.2f}" for x in wr["suppresses"])
        console.print(f"through layer {wr['layer']}: promotes {up}\n{'':>18}suppresses {down}", highlight=False)
    u = d["usage"]
    if u is not None:
        if u["count"]:
            heads = ", ".join(f"L{h['layer']}h{h['head']} {h['count']:,}" for h in u["heads"])
            console.print(f"usage over {u['tokens']:,} tokens: selected {u['count']:,} times, weight mass "
                          f"{u['weight']:.3f}, rank {u['rank']:,} of {u['of']:,} ({u['used_slots']:,} used); "
                          f"heads: {heads}")
        else:
            console.print(f"usage over {u['tokens']:,} tokens: never selected (dead)")
    if d["contexts"]:
        ct = Table(title="top contexts", box=None, padding=(0, 1))
        for c in ("weight", "doc", "pos", "layer/head", "context"):
            ct.add_column(c, justify="right" if c != "context" else "left")
        for c in d["contexts"]:  # decoded text, the firing token marked
            words = [esc(t) for t in c["text"] if t is not None]
            before = sum(1 for t in c["text"][:8] if t is not None)
            words[before] = f"[bold reverse]{words[before]}[/]"
            ct.add_row(f"{c['weight']:.3f}", str(c["document"]), str(c["position"]), f"L{c['layer']}h{c['head']}",
                       "".join(words))
        console.print(ct)
    elif stats is not None and d["contexts"] is None:
        console.print("(the audit kept no top contexts: audit with --contexts M)")
    for e in d["edits"]:
        console.print(f"{e['op']} {e['id']} ({e['kind']}, {e['time']}): {', '.join(e['touched'])} — {e['message']}")
