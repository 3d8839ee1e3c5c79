"""Slot view and report figures, measured in one run (issue: slot view and a browsable report).

1. The demo: audit of the whole world corpus without and with --contexts 8 (side by side), then `memedit report`
   over every used slot with two facts and a prompt: build time and bytes of slot data per used slot.
2. Does a fact's top-contexts evidence point at its subject? For the first --facts facts: is the subject among the
   top contexts of at least one of the fact's five highest-attributed core-set slots?
3. A 1,048,576-slot native model (random weights, built once and cached under ~/.cache/memedit-bench): memory of
   the top-8 contexts while auditing, and `memedit slot ID --stats A.h5` wall time (a fresh process, as a user runs
   it) next to a full `memedit.load` of the same model.

    nice -n 10 .venv/bin/python benchmarks/bench_report.py [--facts 20] [--skip-million] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("MEMEDIT_BENCH_CACHE", Path.home() / ".cache" / "memedit-bench"))


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def demo_figures(n_facts: int, out_dir: Path, max_tokens: int | None = None) -> None:
    import memedit
    from memedit.auditing.audit import audit, open_corpus
    from memedit.auditing.hdf5 import write_audit
    from memedit.auditing.report import build_report, pages_to_trace, traced_page
    from memedit.world.facts import world_of

    demo = memedit.load()
    corpus = open_corpus(None, demo)
    plain, t_plain = timed(audit, demo, corpus, max_tokens)
    stats, t_ctx = timed(audit, demo, corpus, max_tokens, contexts=8)
    print(f"demo audit of {stats.tokens:,} tokens: {t_plain:.1f} s plain, {t_ctx:.1f} s with --contexts 8 "
          f"(x{t_ctx / t_plain:.2f})")
    write_audit(out_dir / "demo-audit.h5", stats)
    summary, t_rep = timed(build_report, demo, out_dir / "site", stats, ["f00000", "f00001"],
                           [("Reidreir was born in", "Thakrian")])
    used = int((stats.table_counts("shared").sum(0) > 0).sum())
    print(f"report: {t_rep:.1f} s for {summary['slots']:,} slots ({used:,} used in the audit), 3 traced pages; slot "
          f"data {summary['slot_bytes'] / 1024:.0f} KiB = {summary['slot_bytes'] / used:.0f} bytes per used slot; "
          f"figures {sum((out_dir / 'site' / f).stat().st_size for f in summary['figures']) / 1024:.0f} KiB")
    hits = 0
    pages = pages_to_trace(demo, [f.id for f in world_of(demo).facts[:n_facts]], [])
    for page in pages:
        d = traced_page(demo, page)
        subject = set(demo.tokenizer.encode(page.fact.subject))
        found = any(subject & set(c["tokens"]) for s in d["fact"]["core_top"]
                    for c in stats.contexts.entries("shared", s))
        hits += found
    print(f"subject among the top contexts of one of the 5 best-attributed core-set slots: {hits} of {len(pages)} "
          "facts")


def million_slot_folder(n_keys: int = 1024) -> Path:
    """A native 1,048,576-slot model (N 1024, 4 heads, k 32, D = V = 256, 2 memory layers, shared table)."""
    path = CACHE / ("slot-view-1m" if n_keys == 1024 else f"slot-view-n{n_keys}")
    if (path / "config.json").is_file():
        return path
    import memedit
    from memedit.lm.memory import MemoryConfig
    from memedit.lm.model import MemoryModel, ModelConfig
    from memedit.storage.checkpoint import save

    demo = memedit.load()
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, vocab_size=demo.config.vocab_size, multiple_of=64,
                      max_seqlen=64, memory=MemoryConfig(layers=[0, 1], n_keys=n_keys, heads=4, knn=32, k_dim=256))
    m = MemoryModel(cfg, tokenizer=demo.tokenizer)
    m.init_weights(0)
    m.meta = dict(demo.meta)
    CACHE.mkdir(parents=True, exist_ok=True)
    return save(m.eval().requires_grad_(False), path)


def million_figures(out_dir: Path, n_keys: int = 1024, n_texts: int = 2000, repeats: int = 3) -> None:
    import memedit
    from memedit.auditing.audit import Corpus, audit, open_corpus
    from memedit.auditing.hdf5 import write_audit

    folder = million_slot_folder(n_keys)
    model, t_load = timed(memedit.load, folder)
    texts = open_corpus(None, model).texts[:n_texts]
    stats, t_audit = timed(audit, model, Corpus(f"{n_texts:,} demo sentences", texts=texts), contexts=8)
    c = stats.contexts
    nbytes = sum(t.numel() * t.element_size() for d in (c.weight, c.key, c.where, c.tokens) for t in d.values())
    print(f"{n_keys * n_keys:,}-slot model: top-8 contexts of {c.weight['shared'].shape[0]:,} slots hold "
          f"{nbytes / 1e6:.1f} MB "
          f"({nbytes / 2**20:.1f} MiB); audit of {stats.tokens:,} tokens {t_audit:.1f} s")
    audit_file = write_audit(out_dir / "m1-audit.h5", stats)
    slot = int(stats.table_counts("shared").sum(0).argmax())
    del model, stats, c
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "memedit_cli", "slot", str(slot), "--model", str(folder), "--stats",
                            str(audit_file), "--json"], capture_output=True, text=True, check=True)
        runs.append(time.perf_counter() - t0)
    d = json.loads(r.stdout)
    imports = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, memedit_cli.app"], check=True)
        imports.append(time.perf_counter() - t0)
    from memedit.auditing.slot import slot_info

    inproc = min(timed(slot_info, folder, slot, stats=audit_file)[1] for _ in range(repeats))
    print(f"`memedit slot {slot} --stats` on the {n_keys * n_keys:,}-slot model: {min(runs):.2f} s best of {repeats} "
          "in a fresh process, of "
          f"which starting Python and importing torch and the CLI {min(imports):.2f} s; slot_info itself "
          f"{inproc:.2f} s; a full memedit.load of the model {t_load:.2f} s; {len(d['contexts'])} contexts, rank "
          f"{d['usage']['rank']}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--skip-million", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="2,000 tokens, 2 facts, a 4,096-slot model: does it run (not a measurement)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_demo:
            demo_figures(2 if args.smoke else args.facts, Path(tmp), 2_000 if args.smoke else None)
        if not args.skip_million:
            million_figures(Path(tmp), *((64, 50, 1) if args.smoke else ()))


if __name__ == "__main__":
    main()
