"""Audit and export speed, side by side in one run.

1. tokens/s of a plain forward pass vs the same forward with slot counting (memedit audit's inner loop) on the
   same pre-tokenized batches, each batch timed both ways back to back; median over rounds; plus the end-to-end
   `audit()` (reading, tokenizing, fingerprint).
2. writing 1,048,576-slot statistics with memedit's exporter vs writing the same arrays directly with h5py and
   the same filters and chunks (gzip 4 + shuffle, 64K-slot chunks).

    nice -n 10 .venv/bin/python benchmarks/bench_audit.py [--tokens 100000] [--rounds 5] [--threads 1] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from memedit.auditing.audit import audit, corpus_batches, open_corpus
from memedit.auditing.hdf5 import FILTERS, _chunks, write_audit
from memedit.auditing.stats import AuditCounter, SlotStats, report
from memedit.lm.batching import pad_batch, pad_id
from memedit.tracing.capture import on_lookup


def demo_or_demo_shaped():
    """The bundled demo model, or (before it is bundled) an untrained model of the same shape and world."""
    import memedit

    try:
        m = memedit.load()
        return m, "bundled demo model" if m.read_only else f"demo model from {m.source}"
    except memedit.MemeditError:
        from memedit.lm.model import MemoryModel
        from memedit.world.train import TrainConfig, demo_config, world_tokenizer

        tc = TrainConfig()
        world = tc.world()
        tok = world_tokenizer(world, tc.vocab_size)
        m = MemoryModel(demo_config(tc, tok.vocab_size), tokenizer=tok)
        m.init_weights(tc.seed)
        m.meta["world"] = dict(world.spec)
        return m.eval().requires_grad_(False), "untrained model of the demo's shape (demo not bundled yet)"


def million_slot_model(demo):
    """An untrained model with 1,048,576-slot memories (N 1024, 4 heads, k 32, K 256) and the demo's tokenizer."""
    from memedit.lm.memory import MemoryConfig
    from memedit.lm.model import MemoryModel, ModelConfig

    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, vocab_size=demo.config.vocab_size, multiple_of=64,
                      max_seqlen=32, memory=MemoryConfig(layers=[0, 1], n_keys=1024, heads=4, knn=32, k_dim=256))
    m = MemoryModel(cfg, tokenizer=demo.tokenizer)
    m.init_weights(0)
    m.meta = dict(demo.meta)
    return m.eval().requires_grad_(False)


@torch.no_grad()
def bench_counting(model, max_tokens: int, batch_size: int, rounds: int) -> None:
    corpus = open_corpus(None, model)
    pad = pad_id(model)
    prepared = []
    for seqs, _ in corpus_batches(model, corpus, batch_size, max_tokens):
        tokens, lengths = pad_batch(seqs, pad)
        prepared.append((tokens, (torch.arange(tokens.shape[1]) < lengths[:, None]).reshape(-1)))
    n_tokens = sum(int(m.sum()) for _, m in prepared)

    counter = AuditCounter(model)

    def plain(tokens: torch.Tensor, mask: torch.Tensor) -> float:
        t = time.perf_counter()
        model(tokens)
        return time.perf_counter() - t

    def audited(tokens: torch.Tensor, mask: torch.Tensor) -> float:
        with on_lookup(model, counter):  # registering the hook is outside the timed call
            counter.batch(mask)
            t = time.perf_counter()
            model(tokens)
            return time.perf_counter() - t

    for tokens, mask in prepared[:4]:  # warm up
        plain(tokens, mask)
    # The machine is shared, so load drifts: time both modes on each batch back to back, alternating which
    # goes first, and compare the per-round sums.
    times: dict[str, list[float]] = {"plain": [], "audit": []}
    for r in range(rounds):
        sums = {"plain": 0.0, "audit": 0.0}
        for b, (tokens, mask) in enumerate(prepared):
            order = ((("plain", plain), ("audit", audited)) if (b + r) % 2 == 0
                     else (("audit", audited), ("plain", plain)))
            for name, fn in order:
                sums[name] += fn(tokens, mask)
        for name in sums:
            times[name].append(sums[name])
    p, a = statistics.median(times["plain"]), statistics.median(times["audit"])
    mem = model.config.memory
    print(f"  {n_tokens:,} tokens in {len(prepared)} batches of {batch_size} documents; memory "
          f"{mem.n_slots:,} slots, {len(mem.layers)} layers, {mem.heads} heads, k {mem.knn}; median of {rounds}")
    print(f"  plain forward   {n_tokens / p:>10,.0f} tokens/s")
    print(f"  audit forward   {n_tokens / a:>10,.0f} tokens/s   overhead {100 * (a / p - 1):+.1f}%  "
          "(per round: "
          f"{', '.join(f'{100 * (y / x - 1):+.1f}%' for x, y in zip(times['plain'], times['audit'], strict=True))})")
    t = time.perf_counter()
    stats = audit(model, corpus, max_tokens, batch_size)
    e = time.perf_counter() - t
    print(f"  end-to-end audit() incl. reading, tokenizing, fingerprint: {stats.tokens / e:,.0f} tokens/s")


def million_slot_stats(accesses: int, seed: int = 0, n_keys: int = 1024) -> SlotStats:
    """Statistics of a 1,048,576-slot memory (N 1024, 4 heads, layers 1 and 3 sharing a table), with skewed use."""
    from memedit.lm.memory import MemoryConfig
    from memedit.lm.model import ModelConfig

    N, H, layers = n_keys, 4, [1, 3]
    g = torch.Generator().manual_seed(seed)
    z = lambda *s: torch.zeros(s, dtype=torch.int64)  # noqa: E731
    cfg = ModelConfig(dim=1024, n_layers=4, memory=MemoryConfig(layers=layers, n_keys=N, heads=H, knn=32))
    s = SlotStats(layers=layers, tables={"shared": layers}, n_keys=N, heads=H, knn=32, counts=z(2, H, N * N),
                  weight_units=z(2, H, N * N), subkey_counts=z(2, H, 2, N), tokens=accesses // 32,
                  corpus="synthetic", fingerprint="0" * 16, config=cfg.to_dict())
    for li in range(2):
        for h in range(H):
            slots = (N * N * torch.rand(accesses // 8, generator=g) ** 3).long()  # a few hot slots, many cold
            s.counts[li, h].index_add_(0, slots, torch.ones_like(slots))
            w = (torch.rand(slots.shape, generator=g) * 2**31).long()
            s.weight_units[li, h].index_add_(0, slots, w)
            sub = torch.randint(0, N, (accesses // 4,), generator=g)
            s.subkey_counts[li, h].view(-1).index_add_(0, sub % (2 * N), torch.ones_like(sub))
    return s


def bench_export(rounds: int, accesses: int, n_keys: int = 1024) -> None:
    stats = million_slot_stats(accesses, n_keys=n_keys)
    metrics = report(stats)
    arrays = {  # the same arrays memedit writes, prepared beforehand for the raw writer
        "counts": (stats.counts.numpy(), 2), "weights": (stats.weights.numpy(), 2),
        "subkey_counts": (stats.subkey_counts.numpy(), 3),
        "table_counts": (stats.table_counts("shared")[None].numpy(), 2),
        "table_weights": (stats.table_weights("shared")[None].numpy(), 2),
    }
    with tempfile.TemporaryDirectory(dir=".") as d:
        ours, raw = Path(d) / "memedit.h5", Path(d) / "raw.h5"

        def memedit_write() -> float:
            t = time.perf_counter()
            write_audit(ours, stats, metrics)
            return time.perf_counter() - t

        def raw_write() -> float:
            t = time.perf_counter()
            with h5py.File(raw, "w") as f:
                for name, (a, slot_axis) in arrays.items():
                    f.create_dataset(name, data=a, chunks=_chunks(a.shape, slot_axis), **FILTERS)
            return time.perf_counter() - t

        times: dict[str, list[float]] = {"memedit": [], "raw": []}
        for _ in range(rounds):
            times["raw"].append(raw_write())
            times["memedit"].append(memedit_write())
        m, r = min(times["memedit"]), min(times["raw"])
        with h5py.File(ours) as a, h5py.File(raw) as b:
            same = all(np.array_equal(a[k][()], b[k][()]) for k in arrays)
        print(f"  {n_keys * n_keys:,} slots x 4 heads x 2 layers (+ shared-table sums), "
              f"{int(stats.counts.sum()):,} accesses; "
              f"best of {rounds}; same arrays in both files: {same}")
        print(f"  raw h5py writes      {r:6.2f} s   {raw.stat().st_size / 2**20:6.1f} MiB")
        print(f"  memedit write_audit  {m:6.2f} s   {ours.stat().st_size / 2**20:6.1f} MiB   ratio {m / r:.2f}x  "
              f"(incl. scales, attributes, metrics JSON, fsync + rename)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--big-tokens", type=int, default=5_000, help="tokens for the 1M-slot model (0: skip it)")
    ap.add_argument("--accesses", type=int, default=8_000_000, help="accesses per layer in the 1M-slot stats")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds in all: does it run (not a measurement)")
    args = ap.parse_args()
    n_keys = 1024
    if args.smoke:
        args.tokens, args.rounds, args.big_tokens, args.accesses, n_keys = 2_000, 1, 0, 20_000, 64
    torch.set_num_threads(args.threads)
    model, what = demo_or_demo_shaped()
    print(f"audit counting overhead ({what}, {args.threads} thread(s))")
    bench_counting(model, args.tokens, args.batch_size, args.rounds)
    if args.big_tokens:
        print(f"audit counting overhead (untrained 1M-slot model, {args.threads} thread(s))")
        bench_counting(million_slot_model(model), args.big_tokens, args.batch_size, args.rounds)
    print(f"export of {n_keys * n_keys:,}-slot statistics")
    bench_export(1 if args.smoke else max(3, args.rounds // 2), args.accesses, n_keys)


if __name__ == "__main__":
    main()
