"""Benchmark `memedit verify` and the incremental exact index on a random 1M-slot memory.

Prints, from one run:
  1. agreement of memedit's lookup with FAISS exact search on random queries (float32 and bfloat16),
  2. verify throughput (blockwise, bounded memory) vs plain faiss.knn over the materialised slot keys,
  3. peak extra memory of the blockwise search (measured in a fresh subprocess),
  4. incremental index update vs full rebuild after changing 8 sub-keys.

Run: nice -n 10 .venv/bin/python benchmarks/bench_verify.py [--n-keys 1024] [--k-dim 512] [--queries 256] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from memedit.keyspace import exact
from memedit.lm.memory import MemoryConfig
from memedit.lm.model import MemoryModel, ModelConfig


def random_memory(n_keys: int, k_dim: int, heads: int, knn: int) -> MemoryModel:
    """A one-block model whose only memory layer has random sub-keys (N² slots); values are tiny (V 8)."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=8, multiple_of=16,
                      memory=MemoryConfig(layers=[0], n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim, v_dim=8))
    m = MemoryModel(cfg)
    m.init_weights(0)
    return m.eval().requires_grad_(False)


PEAK_CHILD = r"""
import json, sys, time
import numpy as np
import faiss
from memedit.keyspace import exact
N, K, n, k = map(int, sys.argv[1:5])
faiss.omp_set_num_threads(1)
rng = np.random.default_rng(0)
keys = rng.standard_normal((2, N, K // 2), dtype=np.float32)
q = rng.standard_normal((n, K), dtype=np.float32)
def status(field):  # this process's own counters (ru_maxrss would include the parent's RSS at fork)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
base = status("VmRSS")
t = time.perf_counter()
exact.exact_search(q, keys, k + 1)
dt = time.perf_counter() - t
print(json.dumps({"base": base, "peak": status("VmHWM"), "seconds": dt}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-keys", type=int, default=1024)
    ap.add_argument("--k-dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--knn", type=int, default=32)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="N 64, K 64, 32 queries: does it run (not a measurement)")
    a = ap.parse_args()
    if a.smoke:
        a.n_keys, a.k_dim, a.queries, a.repeats = 64, 64, 32, 2
    N, K = a.n_keys, a.k_dim
    torch.set_num_threads(a.threads)
    print(f"random memory: N {N} ({N * N:,} slots), K {K}, {a.heads} heads, k {a.knn}; {a.queries} random queries "
          f"per head; {a.threads} thread(s)")
    model = random_memory(N, K, a.heads, a.knn)

    # 1. agreement (the acceptance check on a random 1M-slot memory)
    t = time.perf_counter()
    report = exact.verify(model, exact.random_source(a.queries), "random", [torch.float32, torch.bfloat16],
                          threads=a.threads)
    verify_s = time.perf_counter() - t
    for p in report.passes:
        j = p.to_json()
        print(f"verify {p.dtype:8s}: {j['lookups']:,} lookups, mismatches {j['mismatches']}, identical index sets "
              f"{j['identical']:.2%}, differing only inside ties {j['tie_agree']:.2%}, k-th score ties {j['ties']:,}, "
              f"max |Δscore| {max(h.max_score_diff for h in p.heads):.2e}")
    faults = sum(p.total("reference_faults") + p.total("reference_errors") for p in report.passes)
    print(f"verify total (2 passes incl. lookups): {verify_s:.1f} s -> {'AGREE' if report.ok else 'LOOKUP ERROR'}; "
          f"faulty reference answers {faults} (re-checked by the brute force)")
    if not report.ok:
        raise SystemExit("verify found a lookup error")

    # 2. throughput: blockwise exact search (what verify runs) vs faiss.knn over materialised keys, one head
    import faiss

    faiss.omp_set_num_threads(a.threads)
    keys = model.memory_layers[0].keys4d[0].float().numpy()  # (2, N, K/2)
    q = np.random.default_rng(1).standard_normal((a.queries, K), dtype=np.float32)
    t = time.perf_counter()
    D1, I1 = exact.exact_search(q, keys, a.knn + 1)
    block_s = time.perf_counter() - t
    t = time.perf_counter()
    index = exact.SlotKeyIndex(keys)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    D2, I2 = index.search(q, a.knn + 1)
    knn_s = time.perf_counter() - t
    assert np.array_equal(np.sort(I1[:, : a.knn], 1), np.sort(I2[:, : a.knn], 1)), "blockwise != materialised"
    print(f"throughput, one head: blockwise verify search {a.queries / block_s:,.0f} queries/s; plain faiss.knn over "
          f"materialised keys {a.queries / knn_s:,.0f} queries/s (+{build_s:.2f} s to materialise "
          f"{index.keys.nbytes / 2**30:.2f} GiB) -> blockwise/materialised {knn_s / block_s:.2f}x")

    # 3. peak extra memory of the blockwise search, in a fresh process
    r = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(N), str(K), str(a.queries), str(a.knn)],
                       capture_output=True, text=True, check=True)
    d = json.loads(r.stdout)
    extra = (d["peak"] - d["base"]) / 2**20
    print(f"peak extra memory of blockwise exact search: {extra:,.0f} MiB (limit 1024 MiB; materialised keys "
          f"alone: {N * N * K * 4 / 2**20:,.0f} MiB)")

    # 4. incremental index update vs full rebuild after changing 8 sub-keys (4 per half)
    rng = np.random.default_rng(2)
    upd, reb = [], []
    for _ in range(a.repeats):
        new = index.subkeys.copy()
        for half, i in zip([0, 0, 0, 0, 1, 1, 1, 1], rng.choice(N, 8, replace=False), strict=True):
            new[half, i] = rng.standard_normal(K // 2)
        t = time.perf_counter()
        touched = index.sync(new)
        upd.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.rebuild()
        reb.append(time.perf_counter() - t)
    assert np.array_equal(index.keys, exact.slot_keys(index.subkeys))
    u, b = statistics.median(upd), statistics.median(reb)
    print(f"incremental index, 8 sub-keys changed: update {u * 1e3:.2f} ms ({touched:,} slots rewritten) vs rebuild "
          f"{b * 1e3:.0f} ms ({N * N:,} slots) -> {b / u:.0f}x (floor 50x)")


if __name__ == "__main__":
    main()
