"""Queries/s of memedit's product-key lookup vs FAISS exact inner-product search over all slots, same run.

Batch 1024, k 32, K 256, one head, at 65,536 and 1,048,576 slots; prints the ratio. Also tokens/s of the
bundled demo model's forward pass. Usage: python benchmarks/bench_lookup.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import faiss
import numpy as np
import torch

from memedit.memory import ProductKeySearch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    B, k, K = args.batch, 32, 256
    print(f"threads {args.threads}, batch {B}, k {k}, K {K}")
    print(f"{'slots':>10} {'memedit q/s':>12} {'faiss q/s':>12} {'ratio':>8}")
    for N in (256, 1024):
        g = torch.Generator().manual_seed(0)
        keys = torch.randn(1, 2, N, K // 2, generator=g)  # (H, 2, N, K/2)
        q = torch.randn(B, 1, K, generator=g)
        search = ProductKeySearch(N, k)
        with torch.no_grad():
            search(q, keys)
            t_mem = best_of(partial(search, q, keys), 5)
        # FAISS: materialise all N^2 concatenated keys [C0_i ; C1_j] (slot i*N + j) in an IndexFlatIP
        c0, c1 = keys[0, 0].numpy(), keys[0, 1].numpy()
        full = np.empty((N * N, K), dtype=np.float32)
        full[:, : K // 2] = np.repeat(c0, N, axis=0)
        full[:, K // 2 :] = np.tile(c1, (N, 1))
        index = faiss.IndexFlatIP(K)
        index.add(full)
        del full
        xq = np.ascontiguousarray(q[:, 0].numpy())
        t_faiss = best_of(partial(index.search, xq, k), 1 if N == 1024 else 3)
        # sanity: the same top-k scores
        D, _ = index.search(xq[:8], k)
        with torch.no_grad():
            s = search(q[:8], keys).scores[:, 0].numpy()
        assert np.allclose(np.sort(D, 1), np.sort(s, 1), atol=1e-3), "lookup and FAISS disagree"
        del index
        print(f"{N * N:>10,} {B / t_mem:>12,.0f} {B / t_faiss:>12,.0f} {t_faiss / t_mem:>7.0f}x")

    import memedit

    model = memedit.load()
    T = 16
    tokens = torch.randint(4, model.config.vocab_size, (64, T))
    with torch.no_grad():
        model(tokens)
        t = best_of(lambda: model(tokens), 5)
    print(f"demo model forward: {64 * T / t:,.0f} tokens/s (batch 64 x {T} tokens)")


if __name__ == "__main__":
    main()
