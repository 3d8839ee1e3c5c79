"""Queries/s of memedit's product-key lookup vs FAISS, same run: exact inner-product search over all slots
(``IndexFlatIP``) and FAISS's own product-key search (``MultiIndexQuantizer``, in the inner-product form of
memedit/keyspace/exact.py ``miq_search``).

Batch 1024, k 32, K 256, one head, at 65,536 and 1,048,576 slots; prints both ratios and checks that all three give
the same top-k scores. Also tokens/s of the bundled demo model's forward pass.
Usage: python benchmarks/bench_lookup.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import faiss
import numpy as np
import torch

from memedit.keyspace.exact import miq_index, miq_queries, miq_search
from memedit.lm.memory import ProductKeySearch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    B, k, K = args.batch, 32, 256
    print(f"threads {args.threads}, batch {B}, k {k}, K {K}; queries/s (best of {args.repeats})")
    print(f"{'slots':>10} {'memedit':>9} {'FAISS MIQ':>10} {'FAISS FlatIP':>13} {'vs MIQ':>7} {'vs FlatIP':>9}")
    for N in (256, 1024):
        g = torch.Generator().manual_seed(0)
        keys = torch.randn(1, 2, N, K // 2, generator=g)  # (H, 2, N, K/2)
        q = torch.randn(B, 1, K, generator=g)
        search = ProductKeySearch(N, k)
        xq = np.ascontiguousarray(q[:, 0].numpy())
        miq, M = miq_index(keys[0].numpy())
        xq_miq, _ = miq_queries(xq, M)
        # alternate the two so that load from other jobs on the machine hits both alike
        t_mem, t_miq = [], []
        with torch.no_grad():
            search(q, keys)
            miq.search(xq_miq, k)
            for _ in range(args.repeats):
                t_mem.append(best_of(partial(search, q, keys), 1))
                t_miq.append(best_of(partial(miq.search, xq_miq, k), 1))
        t_mem, t_miq = min(t_mem), min(t_miq)
        # FAISS exact: materialise all N^2 concatenated keys [C0_i ; C1_j] (slot i*N + j) in an IndexFlatIP
        c0, c1 = keys[0, 0].numpy(), keys[0, 1].numpy()
        full = np.empty((N * N, K), dtype=np.float32)
        full[:, : K // 2] = np.repeat(c0, N, axis=0)
        full[:, K // 2 :] = np.tile(c1, (N, 1))
        index = faiss.IndexFlatIP(K)
        index.add(full)
        del full
        t_flat = best_of(partial(index.search, xq, k), 1 if N == 1024 else 3)
        # the same top-k scores from all three (ids may differ only among exact ties)
        D, _ = index.search(xq[:64], k)
        Dm, _ = miq_search(xq[:64], keys[0].numpy(), k, index=(miq, M))
        with torch.no_grad():
            s = search(q[:64], keys).scores[:, 0].numpy()
        assert np.allclose(np.sort(D, 1), np.sort(s, 1), atol=1e-3), "lookup and FAISS IndexFlatIP disagree"
        assert np.allclose(np.sort(Dm, 1), np.sort(s, 1), atol=1e-3), "lookup and FAISS MultiIndexQuantizer disagree"
        del index
        print(f"{N * N:>10,} {B / t_mem:>9,.0f} {B / t_miq:>10,.0f} {B / t_flat:>13,.0f} "
              f"{t_miq / t_mem:>6.2f}x {t_flat / t_mem:>8.0f}x")

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
