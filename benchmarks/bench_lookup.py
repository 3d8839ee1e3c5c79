"""Queries/s of memedit's product-key lookup vs FAISS, same run: exact inner-product search over all slots
(``IndexFlatIP``) and FAISS's own product-key search (``MultiIndexQuantizer``, in the inner-product form of
memedit/keyspace/exact.py ``miq_search``).

Batch 1024, k 32, K 256, one head, at 65,536 and 1,048,576 slots. memedit and MIQ are timed in alternation, one
batch each, ``--runs`` times (so load from other jobs hits both alike); each prints the median with the min–max over
the runs, and the ratio is the median of the per-run ratios. The load average at the start is printed: throughput
figures are only comparable from a quiet machine (load < 0.5). Then every lookup of the batch is checked against
both FAISS searches the way ``memedit verify`` checks them (memedit.keyspace.exact ``compare_head``): a faulty FAISS
answer (MIQ has returned a slot twice inside a tie) is reported and the query re-checked by the brute force;
only a confirmed lookup error stops the benchmark. Also tokens/s of the bundled demo model's forward pass.

Usage: python benchmarks/bench_lookup.py [--threads 1] [--runs 7] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import faiss
import numpy as np
import torch

from memedit.keyspace import exact
from memedit.lm.memory import ProductKeySearch


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def spread(values: list[float]) -> str:
    """'median (min–max)' of queries/s figures."""
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def check(xq: np.ndarray, keys: np.ndarray, lookup, index, rtol: float) -> dict[str, exact.HeadReport]:
    """memedit's lookups judged against FAISS IndexFlatIP and MIQ, as `memedit verify` judges them."""
    slots, scores = lookup.indices[:, 0].numpy(), lookup.scores[:, 0].float().numpy()
    return {
        "FlatIP": exact.compare_head(xq, keys, slots, scores, rtol, exact.HeadReport(0, 0), index=index),
        "MIQ": exact.compare_head(xq, keys, slots, scores, rtol, exact.HeadReport(0, 0), reference="miq"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=7, help="alternating timed runs per size (at least 5)")
    ap.add_argument("--sizes", default="256,1024", help="N per size, comma-separated (N² slots)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds in all: does it run (not a measurement)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.batch = "32,64", 64
    runs = max(args.runs, 5)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    B, k, K = args.batch, 32, 256
    load = os.getloadavg()
    print(f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
          + ("" if load[0] < 0.5 else " -- NOT a quiet machine: throughput figures are not comparable"))
    print(f"threads {args.threads}, batch {B}, k {k}, K {K}; queries/s, median (min–max) of {runs} alternating runs")
    print(f"{'slots':>10} {'memedit':>24} {'FAISS MIQ':>24} {'FAISS FlatIP':>13} {'vs MIQ':>18} {'vs FlatIP':>9}")
    rtol = exact.rtol_for(torch.float32)
    faults = []
    for N in (int(x) for x in args.sizes.split(",")):
        g = torch.Generator().manual_seed(0)
        keys = torch.randn(1, 2, N, K // 2, generator=g)  # (H, 2, N, K/2)
        q = torch.randn(B, 1, K, generator=g)
        search = ProductKeySearch(N, k)
        xq = np.ascontiguousarray(q[:, 0].numpy())
        miq, M = exact.miq_index(keys[0].numpy())
        xq_miq, _ = exact.miq_queries(xq, M)
        t_mem, t_miq = [], []
        with torch.no_grad():
            lookup = search(q, keys)  # warm-up, and the lookups checked below
            miq.search(xq_miq, k)
            for _ in range(runs):  # alternate the two so that load from other jobs hits both alike
                t_mem.append(seconds(partial(search, q, keys)))
                t_miq.append(seconds(partial(miq.search, xq_miq, k)))
        # FAISS exact: materialise all N^2 concatenated keys [C0_i ; C1_j] (slot i*N + j) in an IndexFlatIP
        index = faiss.IndexFlatIP(K)
        index.add(exact.slot_keys(keys[0].numpy()))
        t_flat = min(seconds(partial(index.search, xq, k)) for _ in range(1 if N >= 1024 else 3))
        reports = check(xq, keys[0].numpy(), lookup, index, rtol)
        del index
        for name, rep in reports.items():
            if rep.mismatches or rep.unproven:
                ex = rep.examples[0] if rep.examples else None
                raise SystemExit(f"LOOKUP ERROR at {N * N:,} slots against {name}: {rep.mismatches} of {rep.lookups} "
                                 f"lookups ({ex.reason if ex else 'unproven'})")
            faults += [(N * N, name, f) for f in rep.faults]
        ratios = [b / a for a, b in zip(t_mem, t_miq, strict=True)]
        print(f"{N * N:>10,} {spread([B / t for t in t_mem]):>24} {spread([B / t for t in t_miq]):>24} "
              f"{B / t_flat:>13,.0f} {statistics.median(ratios):>5.2f}x ({min(ratios):.2f}–{max(ratios):.2f}) "
              f"{t_flat / statistics.median(t_mem):>8.0f}x")
    print(f"every lookup checked against FlatIP and MIQ: no lookup error; {len(faults)} faulty FAISS answers "
          f"(re-checked by the brute force)")
    for slots, name, f in faults:
        print(f"  {slots:,} slots, {name}, query {f.query}: {f.kind}: {f.reason}")

    import memedit

    model = memedit.load()
    T, n = 16, 8 if args.smoke else 64
    tokens = torch.randint(4, model.config.vocab_size, (n, T))
    with torch.no_grad():
        model(tokens)
        t = min(seconds(partial(model, tokens)) for _ in range(5))
    print(f"demo model forward: {n * T / t:,.0f} tokens/s (batch {n} x {T} tokens)")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
