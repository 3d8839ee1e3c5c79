"""audit (slot utilization over a corpus, and `audit diff`) and export (slot statistics and more to HDF5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from typer.core import TyperGroup

from memedit import limits

from .common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    StepProgress,
    app,
    command,
    console,
    err_console,
    esc,
    fail,
    load_model,
    print_json,
)

BASIC = ("used", "kl_uniform", "gini", "top50", "top99", "top1pct_share", "dead")  # all metrics: --json


def _fmt(metric: str, v: Any) -> str:
    if v is None:
        return "-"
    if metric in ("top50", "top90", "top99", "dead"):
        return f"{int(v):,}"
    if metric == "used":  # two decimals: 7 dead slots of 16,384 must not read as 100.0%
        return f"{v:.2f}%"
    if metric == "top1pct_share":
        return f"{100 * v:.1f}%"
    return f"{v:.3f}"


def _metrics_table(rows: list[dict], title: str) -> Table:
    from rich import box

    from memedit.auditing.stats import scope_label

    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    t.add_column("scope", no_wrap=True)
    t.add_column("basis", no_wrap=True)
    for label in ("used", "KL", "Gini", "top50", "top99", "top1%", "dead"):  # one per BASIC metric
        t.add_column(label, justify="right", no_wrap=True)
    for r in rows:
        t.add_row(scope_label(r, short=True), r["basis"], *(_fmt(m, r[m]) for m in BASIC))
    return t


class _AuditGroup(TyperGroup):
    """`memedit audit [CORPUS]` runs `audit run`; `memedit audit diff A.h5 B.h5` is a subcommand of its own."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["run", *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    cls=_AuditGroup,
    help="Audit how the memory is used over a corpus (`audit CORPUS` = `audit run CORPUS`), or compare two audits "
    "(`audit diff A.h5 B.h5`).\n\nExamples: memedit audit corpus.txt --out audit.h5; memedit audit diff a.h5 b.h5")
app.add_typer(audit_app, name="audit")


@command(audit_app, "run")
def audit(
    corpus: Annotated[Optional[str], typer.Argument(
        help="Text file (one document per line) or JSONL with a \"text\" field; default: the demo world's corpus.",
        show_default=False, metavar="CORPUS")] = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", "-n", min=1, max=limits.INT64_MAX,
                                                  help="Stop after N tokens.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=limits.MAX_BATCH_SIZE,
                                            help=f"Documents per forward pass (at most {limits.MAX_BATCH_SIZE:,}).")
                          ] = 64,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the statistics to FILE.h5.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Plot usage curves and slot heat maps to FILE.png.")
                    ] = None,
    heads: Annotated[bool, typer.Option("--heads", help="Also show every head's metrics.")] = False,
    subkeys: Annotated[bool, typer.Option("--subkeys", help="Also show sub-key balance per head and half.")] = False,
    contexts: Annotated[int, typer.Option(
        "--contexts", min=0, max=1024, help="Keep each slot's M highest-weight contexts in --out (see `memedit "
        f"slot`); at most 1,024, and at most {limits.MAX_CONTEXT_BYTES / 2**30:g} GiB of contexts in memory (58 bytes "
        "per slot and context).")
    ] = 0,
    distributed: Annotated[bool, typer.Option(
        "--distributed",
        help="Run as one rank of a torchrun job (torchrun --nproc-per-node P -m memedit_cli audit --distributed ...).")
    ] = False,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json: JsonOpt = False,
) -> None:
    """Audit how the memory is used over a corpus: per table, layer and head, used %, KL to uniform, Gini,
    top50/90/99, the top 1% of slots' share, dead slots and entropy, by access count and by softmax weight.

    Example: memedit audit corpus.txt --tokens 100000 --out audit.h5 --plot usage.png --contexts 8
    """
    from memedit.auditing.audit import audit as run
    from memedit.auditing.audit import audit_distributed, open_corpus
    from memedit.auditing.stats import report
    from memedit.storage.checkpoint import check_output

    m = load_model(model, dtype, device=device)
    if out is not None:
        check_output(m, out)
    src = open_corpus(corpus, m)
    import os

    with TokenProgress(disable=json or os.environ.get("RANK", "0") != "0") as progress:
        if distributed:
            stats, rank = audit_distributed(m, src, tokens, batch_size, progress, contexts=contexts)
        else:
            stats, rank = run(m, src, tokens, batch_size, progress, contexts=contexts), 0
    if rank != 0:
        return
    rows = report(stats)
    if out is not None:
        from memedit.auditing.hdf5 import write_audit

        write_audit(out, stats, metrics=rows)
    if plot is not None:
        from memedit.auditing.plots import plot_usage

        plot_usage(stats, plot)
    if json:
        return print_json({"corpus": stats.corpus, "tokens": stats.tokens, "fingerprint": stats.fingerprint,
                           "out": str(out) if out else None, "plot": str(plot) if plot else None, "metrics": rows})
    shown = [r for r in rows if r["scope"] in ("table", "layer") or (heads and r["scope"] == "head")
             or (subkeys and r["scope"] == "subkey")]
    console.print(_metrics_table(shown, f"slot usage over {stats.tokens:,} tokens of {esc(stats.corpus)}"))
    for r in rows:
        if r["scope"] == "table" and r["basis"] == "count":
            console.print(f"table {r['table']}: {r['used']:.2f}% of {stats.n_slots:,} slots used, "
                          f"{r['dead']:,} dead, Gini {r['gini']:.3f}")
    if out is not None:
        console.print(f"wrote {out}")
    if plot is not None:
        console.print(f"wrote {plot}")


class TokenProgress:
    """A rich progress bar (tokens, tokens/s, ETA) that the library calls as progress(tokens, fraction)."""

    def __init__(self, disable: bool):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("auditing"), BarColumn(), TextColumn("{task.fields[tokens]:,} tokens"),
                            TextColumn("{task.fields[rate]:,.0f} tokens/s"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=err_console, disable=disable, transient=True)
        self.task = self.bar.add_task("audit", total=1000, tokens=0, rate=0.0)

    def __enter__(self):
        import time

        self.t0 = time.perf_counter()
        self.bar.__enter__()
        return self

    def __call__(self, tokens: int, fraction: float) -> None:
        import time

        rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=1000 * fraction, tokens=tokens, rate=rate)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


@command(audit_app, "diff")
def diff(
    files: Annotated[list[Path], typer.Argument(help="Audit A.h5 and audit B.h5 (`memedit audit --out`).",
                                                show_default=False, metavar="A.h5 B.h5")],
    top: Annotated[int, typer.Option("--top", min=1, help="Slots to list that gained/lost use.")] = 10,
    json: JsonOpt = False,
) -> None:
    """How use changed between two audits (e.g. before and after changing sub-keys): slots that gained and lost
    use, slots that died or came alive, and every metric before and after.

    Example: memedit audit diff before.h5 after.h5 --top 5
    """
    if len(files) != 2:
        fail("`memedit audit diff` needs two audit files: memedit audit diff A.h5 B.h5")
    from memedit.auditing.hdf5 import read_audit
    from memedit.auditing.stats import compare

    a, b = (read_audit(f) for f in files)
    d = compare(a, b, top)
    if json:
        return print_json(d)
    console.print(f"A: {files[0]} ({a.tokens:,} tokens)   B: {files[1]} ({b.tokens:,} tokens)"
                  + ("" if d["same_model"] else "   [yellow]different model weights[/]"))
    for name, t in d["tables"].items():
        console.print(f"[bold]table {name}[/]: {t['changed_slots']:,} slots changed use, "
                      f"{t['died']:,} went dead, {t['came_alive']:,} came alive (accesses per 1,000 tokens)")
        if t["gained"] or t["lost"]:
            st = Table(box=None, padding=(0, 2))
            for c in ("gained slot", "before→after", "lost slot", "before→after"):
                st.add_column(c, justify="right")
            for n in range(max(len(t["gained"]), len(t["lost"]))):
                cells = []
                for kind in ("gained", "lost"):
                    x = t[kind][n] if n < len(t[kind]) else None
                    cells += [str(x["slot"]), f"{x['before']:.2f}→{x['after']:.2f}"] if x else ["", ""]
                st.add_row(*cells)
            console.print(st)
    tb = Table(title="metric changes (A → B)")
    for c in ("scope", "basis", "used", "Gini", "KL unif", "top50", "top 1%", "dead"):
        tb.add_column(c, justify="right" if c not in ("scope", "basis") else "left")
    for r in d["metrics"]:
        cells = [f"{_fmt(m, r[m]['before'])}→{_fmt(m, r[m]['after'])}"
                 for m in ("used", "gini", "kl_uniform", "top50", "top1pct_share", "dead")]
        tb.add_row(r["scope"], r["basis"], *cells)
    console.print(tb)


@command(app)
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="The HDF5 file to write.")],
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Include this audit's statistics (audit --out).")
                     ] = None,
    top_tokens: Annotated[int, typer.Option("--top-tokens", min=0, max=limits.MAX_TOP_TOKENS,
                                            help="Top promoted tokens per slot (0: none; at most "
                                                 f"{limits.MAX_TOP_TOKENS:,} and the vocabulary).")
                          ] = 10,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json: JsonOpt = False,
) -> None:
    """Export the memory to one HDF5 file (schema: docs/hdf5-schema.md): value-row and sub-key norms, top promoted
    tokens per slot with the vocabulary, frozen rows, the edit log, and an audit's statistics with --stats.

    Example: memedit audit --out audit.h5 && memedit export --out memory.h5 --stats audit.h5
    """
    from memedit.auditing.hdf5 import NO_TOP_TOKENS, read_audit, top_tokens_skipped
    from memedit.auditing.hdf5 import export as run
    from memedit.auditing.stats import report
    from memedit.storage.checkpoint import check_output

    audit_stats = read_audit(stats) if stats is not None else None
    m = load_model(model, dtype, device=device)
    check_output(m, out)
    metrics = report(audit_stats) if audit_stats is not None else None
    with StepProgress("exporting", "slots", disable=json) as bar:
        path = run(out, m, audit_stats, metrics, top_k=top_tokens, progress=bar)
    size = path.stat().st_size
    note = NO_TOP_TOKENS if top_tokens_skipped(m, top_tokens) else None
    if json:
        return print_json({"out": str(path), "bytes": size, "stats": str(stats) if stats else None,
                           "tokens": audit_stats.tokens if audit_stats else 0, "note": note})
    console.print(f"wrote {path} ({size / 2**20:.1f} MiB)"
                  + (f" with statistics of {audit_stats.tokens:,} tokens" if audit_stats else ""))
    if note:
        console.print(f"[yellow]note[/] {note}")
