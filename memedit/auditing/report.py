"""A static, self-contained report site: the audit's figures, a page per slot, per traced fact and for the edit log.

    memedit report --out site/ --stats audit.h5 --fact f00000 --prompt "Reidreir was born in" --target Shoushour

The site opens from ``file://`` with no server and no network: pages are plain HTML with one script
(memedit/auditing/report_site/report.js), and the data ship as ``<script src>`` files that assign to ``window.MEMEDIT``
(Chromium refuses ``fetch()`` of local files). The slot page is generated in the browser from data files holding
512 slots each, so a 1M-slot model is ~2,000 small files, not a million pages; only slots with something to show
(used in the audit, selected by a traced fact, frozen or edited) are written. Figures are SVG made by matplotlib.

Layout of the folder::

    index.html slot.html fact.html edits.html report.js report.css memedit-report.json
    figures/{usage,lorenz,heads,dead}.svg
    data/meta.js data/vocab.js data/search.js data/edits.js
    data/slots/{table}-{shard}.js      MEMEDIT.addSlots(table, shard, {slot: record})
    data/facts/{n}.js                  MEMEDIT.addFact(n, page)

A slot record (compact keys, documented in report.js ``renderSlot``): c count, w weight mass, r rank, h heads
[[layer, head, count]], v value-row norm, k sub-key norms [[layer, head, |i|, |j|]], p / s promoted / suppressed
per reading layer [[token id, logit]], x top contexts [[weight, document, position, layer, head, [token ids]]],
z frozen, e edit ids, t traced pages that selected it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MemeditError
from ..lm.model import MemoryModel
from ..lm.tokenizer import token_text
from ..storage.checkpoint import atomic_dir, fingerprint
from ..storage.patch import Patch
from ..storage.state import edit_log, frozen_rows
from ..tracing.causal import causal_trace
from ..tracing.readout import Readout, top_tokens
from ..tracing.trace import trace, trace_fact
from ..world.facts import world_of
from .hdf5 import check_same_model
from .stats import SlotStats, usage_metrics
from .stats import report as usage_report

SHARD = 512  # slots per data file
MARKER = "memedit-report.json"
SITE = Path(__file__).parent / "report_site"  # the static pages and script
Progress = Callable[[str], None]


@dataclass
class TracedPage:
    """What to trace for a fact or prompt page: a fact of the model's world, or a prompt and target."""

    prompt: str
    target: str | None
    fact: Any = None  # a memedit.world.facts.Fact, for its phrasings, subject and core set
    subject: str | None = None  # the words to corrupt for causal tracing (a fact's subject)


def _r(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


# ---- a traced fact or prompt ---------------------------------------------------------------------------------
def traced_page(model: MemoryModel, page: TracedPage, n_tokens: int = 5) -> dict[str, Any]:
    """The data of one fact or prompt page: the target's probability and rank, per memory layer and head the
    selected slots with weight, attribution and ablation, the top-attributed slots with what they write, the
    causal-tracing grid (when a subject is known), and for a fact its phrasings and core set.

    The target is a token sequence (memedit/tracing/targets.py): ``targets`` holds one entry per target token, at the
    position that predicts it; attributions are to that token's logit, ablations change the whole target's
    log-probability (memedit/tracing/trace.py).
    """
    t = trace(model, page.prompt, page.target)
    targets, top = [], []
    for pos in t.target_positions:  # one entry per target token, each scored with teacher forcing
        rep = t.position_report(pos, top_slots=10, n_tokens=n_tokens)
        layers = []
        for lay in rep["layers"]:
            heads = [{"head": h["head"], "slots": [[s["slot"], _r(s["weight"]), _r(s["attribution"]),
                                                    _r(s["ablation"])] for s in h["slots"]]} for h in lay["heads"]]
            layers.append({"layer": lay["layer"], "table": lay["table"], "attribution": _r(lay["attribution"]),
                           "heads": heads})
        targets.append({"position": pos, "token": rep["scored"]["token"], "prob": _r(rep["scored"]["prob"]),
                        "rank": rep["scored"]["rank"], "layers": layers,
                        "top_slots": [{"layer": s["layer"], "head": s["head"], "slot": s["slot"], "table": s["table"],
                                       "attribution": _r(s["attribution"]), "ablation": _r(s["ablation"]),
                                       "promotes": [x["token"] for x in s["promotes"]]} for s in rep["top_slots"]]})
        top = top or [[x["token"], _r(x["prob"])] for x in rep["top"]]
    out: dict[str, Any] = {
        "prompt": page.prompt, "tokens": [t.token_at(p) for p in range(t.prompt_len)],
        "target": {"text": t.target.text, "tokens": t.target.tokens, "prob": _r(t.target_prob),
                   "logprob": _r(t.logprob), "exact_match": t.exact_match, "note": t.target.note},
        "top": top, "targets": targets, "causal": None, "fact": None,
    }
    if page.subject:
        ct = causal_trace(model, page.prompt, page.subject, t.target.text)
        out["causal"] = {"subject": ct.subject, "tokens": ct.tokens, "subject_positions": ct.subject_positions,
                         "layers": ct.layers,
                         "clean": _r(ct.clean_prob), "corrupted": _r(ct.corrupted_prob),
                         "effect": [[_r(x) for x in row] for row in ct.indirect_effect.tolist()]}
    if page.fact is not None:
        f = page.fact
        ft = trace_fact(model, f)
        ranked = [(u.layer, u.slot) for u, _ in t.ranked()]
        core = {(L, s) for tname, slots in ft.core_set.items() for L in model.table(tname).layers for s in slots}
        out["fact"] = {"id": f.id, "relation": f.relation, "subject": f.subject, "target": f.target_true,
                       "phrasings": [{k: p[k] for k in ("prompt", "heldout", "rank", "answered", "flip")}
                                     | {"prob": _r(p["prob"])} for p in ft.phrasings],
                       "core_set": ft.core_set,
                       "core_top": [s for L, s in ranked if (L, s) in core][:5]}
    return out


def pages_to_trace(model: MemoryModel, facts: list[str], prompts: list[tuple[str, str | None]]) -> list[TracedPage]:
    """The pages asked for: fact ids of the model's world (a one-line error for an unknown id) and prompts."""
    out = []
    if facts:
        world = world_of(model)
        for fid in facts:
            f = world.fact(fid)
            out.append(TracedPage(f.prompt.format(f.subject), f.target_true, fact=f, subject=f.subject))
    for p, tgt in prompts:
        out.append(TracedPage(p, tgt))
    return out


# ---- slots -----------------------------------------------------------------------------------------------------
@dataclass
class _Slots:
    """Per table, the slot records being built."""

    records: dict[str, dict[int, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))

    def get(self, table: str, slot: int) -> dict[str, Any]:
        return self.records[table].setdefault(slot, {})


def _slot_records(model: MemoryModel, stats: SlotStats | None, extra: dict[str, set[int]], n: int,
                  slots: _Slots) -> None:
    """Fill records for every slot of every table that was used in the audit or is in ``extra``."""
    frozen = frozen_rows(model)
    edits: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for e in edit_log(model):
        for tname, rows in (e.get("rows") or {}).items():
            for r in rows:
                edits[tname][int(r)].append(str(e.get("id")))
    mem = model.config.memory
    N, H = mem.n_keys, mem.heads
    for table in model.tables:
        name = table.name
        want = set(extra.get(name, set()))
        want |= set(frozen.get(name, torch.empty(0, dtype=torch.long)).tolist())
        want |= set(edits[name])
        if stats is not None:
            counts = stats.table_counts(name)  # (H, S)
            total = counts.sum(0)  # (S,)
            want |= set(total.nonzero().flatten().tolist())
            asc = total.sort().values
            weights = stats.table_weights(name).sum(0)
        ids = torch.tensor(sorted(want), dtype=torch.long)
        if not len(ids):
            continue
        frozen_set = set(frozen.get(name, torch.empty(0, dtype=torch.long)).tolist())
        rows = table.weight.detach()
        norms = rows[ids].float().norm(dim=1)
        i, j = ids // N, ids % N
        key_norms = {L: model.memory_layers[L].keys4d.detach().float().norm(dim=-1) for L in table.layers}  # (H,2,N)
        for b, s in enumerate(ids.tolist()):
            rec = slots.get(name, s)
            rec["v"] = _r(float(norms[b]))
            rec["k"] = [[L, h, _r(float(key_norms[L][h, 0, i[b]]), 3), _r(float(key_norms[L][h, 1, j[b]]), 3)]
                        for L in table.layers for h in range(H)]
            if s in frozen_set:
                rec["z"] = 1
            if edits[name].get(s):
                rec["e"] = edits[name][s]
        if stats is not None:
            li = {L: stats.layer_index(L) for L in table.layers}
            c_sel = total[ids]
            ranks = (len(asc) - torch.searchsorted(asc, c_sel, right=True) + 1).tolist()
            per_head = {L: stats.counts[li[L]][:, ids] for L in table.layers}  # (H, n)
            for b, s in enumerate(ids.tolist()):
                rec = slots.get(name, s)
                c = int(c_sel[b])
                rec["c"], rec["w"] = c, _r(float(weights[s]))
                if c:
                    rec["r"] = ranks[b]
                    rec["h"] = [[L, h, int(per_head[L][h, b])] for L in table.layers for h in range(H)
                                if per_head[L][h, b] > 0]
            if stats.contexts is not None:
                ctx = stats.contexts
                for s in ids.tolist():
                    got = ctx.entries(name, s)
                    if got:
                        slots.get(name, s)["x"] = [[_r(x["weight"]), x["document"], x["position"], x["layer"],
                                                    x["head"], x["tokens"]] for x in got]
        # what each row writes through each reading layer: the position-independent readout, in blocks
        if model.output is not None:
            for L in table.layers:
                ro = Readout.of(model, L)
                for start in range(0, len(ids), 2048):
                    part = ids[start : start + 2048]
                    logits = ro.logits(rows[part])
                    uv, ui = top_tokens(logits, n, True)
                    dv, di = top_tokens(logits, n, False)
                    for b, s in enumerate(part.tolist()):
                        rec = slots.get(name, s)
                        for key, vals, toks in (("p", uv[b], ui[b]), ("s", dv[b], di[b])):
                            rec.setdefault(key, []).append(
                                [L, [[int(t), _r(float(v), 3)] for v, t in zip(vals, toks, strict=True)]])


# ---- figures ---------------------------------------------------------------------------------------------------
def _figures(stats: SlotStats, out: Path) -> list[dict[str, str]]:
    """Four SVG figures of the audit: usage histogram, Lorenz curve, per-head use, dead slots."""
    try:
        import matplotlib  # lazy: optional ([plot] extra) and slow to import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: optional ([plot] extra) and slow to import
    except ImportError:
        raise MemeditError("the report's figures need matplotlib: pip install 'memedit[plot]'") from None

    plt.rcParams.update({"svg.hashsalt": "memedit", "font.size": 9})  # reproducible SVG ids
    out.mkdir(parents=True, exist_ok=True)
    figs = []

    def save(fig, name: str, title: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{name}.svg", format="svg", metadata={"Date": None})
        plt.close(fig)
        figs.append({"file": f"figures/{name}.svg", "title": title, "caption": caption})

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name in stats.tables:
        total = stats.table_counts(name).sum(0).double()
        used = total[total > 0]
        if len(used):
            bins = np.logspace(0, np.log10(float(used.max()) + 1), 40)
            ax.hist(used.numpy(), bins=bins, histtype="step", label=f"table {name}")
    ax.set_xscale("log")
    ax.set_xlabel("accesses per used slot (all heads and layers)")
    ax.set_ylabel("slots")
    ax.legend()
    save(fig, "usage", "Usage histogram", f"How often each used slot was selected over {stats.tokens:,} tokens.")

    fig, ax = plt.subplots(figsize=(4, 3.6))
    for name in stats.tables:
        total = stats.table_counts(name).sum(0).double().sort().values
        cum = torch.cat([torch.zeros(1), total.cumsum(0) / max(float(total.sum()), 1.0)])
        x = torch.linspace(0, 1, len(cum))
        g = usage_metrics(total)["gini"]
        ax.plot(x.numpy(), cum.numpy(), label=f"table {name} (Gini {g:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="uniform use")
    ax.set_xlabel("share of slots (least used first)")
    ax.set_ylabel("share of accesses")
    ax.legend(fontsize=8)
    save(fig, "lorenz", "Lorenz curve", "The further below the diagonal, the more concentrated the use.")

    labels = [f"L{L}h{h}" for L in stats.layers for h in range(stats.heads)]
    used_pct = [100 * float((stats.counts[li, h] > 0).double().mean()) for li in range(len(stats.layers))
                for h in range(stats.heads)]
    dead = [int((stats.counts[li, h] == 0).sum()) for li in range(len(stats.layers)) for h in range(stats.heads)]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(labels) + 1.5), 3))
    ax.bar(labels, used_pct, color="#4c72b0")
    ax.set_ylabel("% of slots used")
    ax.set_ylim(0, 100)
    ax.tick_params(axis="x", rotation=90 if len(labels) > 12 else 0)
    save(fig, "heads", "Per-head use", "Share of the slots each (layer, head) selected at least once.")

    N = stats.n_keys
    names = list(stats.tables)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        grid = (stats.table_counts(name).sum(0) == 0).view(N, N).numpy()
        ax.imshow(grid, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"table {name}: {int(grid.sum()):,} dead of {N * N:,}", fontsize=9)
        ax.set_xlabel("sub-key j")
        ax.set_ylabel("sub-key i")
    save(fig, "dead", "Dead slots", "Black: slots no head ever selected, on the N × N grid of slot i·N + j. "
         f"Dead per (layer, head): {', '.join(f'{a} {d:,}' for a, d in zip(labels, dead, strict=True))}.")
    return figs


# ---- edits -----------------------------------------------------------------------------------------------------
def _edit_pages(model: MemoryModel) -> list[dict[str, Any]]:
    """The edit log, oldest first, each value patch with the norm of every row's change."""
    out = []
    for e in edit_log(model):
        item = {k: e.get(k) for k in ("op", "id", "time", "kind", "message", "tables", "layers", "forced")}
        item["rows"] = e.get("rows") or {}
        item["changes"] = None
        path = Path(model.source or "") / "memedit" / str(e.get("file", ""))
        if e.get("kind") != "keys" and path.is_file():
            try:
                p = Patch.load(path)
                item["changes"] = {c.table: [[int(r), _r(float(d))] for r, d in
                                             zip(c.rows, (c.new.float() - c.old.float()).norm(dim=1), strict=True)]
                                   for c in p.changes}
                item["info"] = p.info
            except MemeditError:
                pass
        out.append(item)
    return out


# ---- the site --------------------------------------------------------------------------------------------------
def _js(path: Path, call: str, *args: Any) -> int:
    """Write ``MEMEDIT.call(args...);`` as a data file; returns its size in bytes."""
    text = f"MEMEDIT.{call}({', '.join(json.dumps(a, separators=(',', ':')) for a in args)});\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return len(text.encode())


def build_report(model: MemoryModel, out: str | Path, stats: SlotStats | None = None, facts: list[str] = (),
                 prompts: list[tuple[str, str | None]] = (), n_tokens: int = 5,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Write the report site to ``out`` (atomically: a previous report there is replaced whole, anything else is
    refused); returns a summary: folder, pages, slots written, bytes of slot data, seconds."""
    t0 = time.perf_counter()
    say = progress or (lambda s: None)
    out = Path(out).expanduser()
    old = None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / MARKER).is_file():
            raise MemeditError(f"{out} exists and is not a memedit report; choose a new folder")
        old = out.with_name(f".{out.name}.previous")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    fp = fingerprint(model)
    if stats is not None:
        check_same_model(stats, model, fp)
    pages = pages_to_trace(model, list(facts), list(prompts))
    try:
        with atomic_dir(out) as tmp:
            for f in SITE.iterdir():
                shutil.copy(f, tmp / f.name)
            slots = _Slots()
            traced, extra = [], defaultdict(set)
            for n, page in enumerate(pages):
                say(f"tracing {page.fact.id if page.fact else repr(page.prompt)}")
                d = traced_page(model, page, n_tokens)
                label = d["fact"]["id"] if d["fact"] else f"p{n}"
                for lay in (lay for tg in d["targets"] for lay in tg["layers"]):
                    for h in lay["heads"]:
                        for s in h["slots"]:
                            extra[lay["table"]].add(s[0])
                            rec = slots.get(lay["table"], s[0])
                            if label not in rec.setdefault("t", []):
                                rec["t"].append(label)
                _js(tmp / "data" / "facts" / f"{n}.js", "addFact", n, d)
                traced.append({"n": n, "label": label, "prompt": d["prompt"], "target": d["target"]["text"],
                               "subject": d["fact"]["subject"] if d["fact"] else None})
            say("reading out the slots")
            _slot_records(model, stats, extra, n_tokens, slots)
            slot_bytes, shards = 0, {}
            for table, recs in slots.records.items():
                by_shard: dict[int, dict[str, Any]] = defaultdict(dict)
                for s, rec in recs.items():
                    by_shard[s // SHARD][str(s)] = rec
                shards[table] = sorted(by_shard)
                for sh, part in by_shard.items():
                    slot_bytes += _js(tmp / "data" / "slots" / f"{table}-{sh}.js", "addSlots", table, sh, part)
            say("drawing the figures")
            figures = _figures(stats, tmp / "figures") if stats is not None else []
            tok = model.tokenizer
            vocab = [token_text(tok, i) for i in range(tok.vocab_size)] if tok is not None else []
            _js(tmp / "data" / "vocab.js", "setVocab", vocab)
            _js(tmp / "data" / "search.js", "setSearch", _token_index(slots))
            edits = _edit_pages(model)
            _js(tmp / "data" / "edits.js", "setEdits", edits)
            mem = model.config.memory
            meta = {
                "model": str(model.source or "in memory"), "fingerprint": fp, "dim": model.config.dim,
                "layers": list(mem.layers), "heads": mem.heads, "knn": mem.knn, "n_keys": mem.n_keys,
                "n_slots": mem.n_slots, "tables": {t.name: list(t.layers) for t in model.tables},
                "shard": SHARD, "shards": shards, "pages": traced, "figures": figures, "edits": len(edits),
                "audit": None if stats is None else {
                    "corpus": stats.corpus, "tokens": stats.tokens, "contexts": stats.contexts is not None,
                    "metrics": [r for r in usage_report(stats) if r["scope"] in ("table", "layer")]},
                "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
            _js(tmp / "data" / "meta.js", "setMeta", meta)
            n_slots = sum(len(r) for r in slots.records.values())
            summary = {"out": str(out), "slots": n_slots, "slot_bytes": slot_bytes,
                       "bytes_per_slot": slot_bytes / max(n_slots, 1), "pages": len(traced), "edits": len(edits),
                       "figures": [f["file"] for f in figures], "seconds": 0.0}
            (tmp / MARKER).write_text(json.dumps({"fingerprint": fp, "built": meta["built"]}) + "\n")
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)  # put the previous report back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _token_index(slots: _Slots, per_token: int = 30) -> dict[str, list[list]]:
    """Search index: token id -> up to ``per_token`` [table, slot] whose strongest promoted token it is."""
    best: dict[int, list[tuple[float, str, int]]] = defaultdict(list)
    for table, recs in slots.records.items():
        for s, rec in recs.items():
            for _, top in rec.get("p", [])[:1]:
                if top:
                    best[top[0][0]].append((top[0][1], table, s))
    return {str(t): [[tb, s] for _, tb, s in sorted(v, key=lambda x: (-x[0], x[1], x[2]))[:per_token]]
            for t, v in best.items()}
