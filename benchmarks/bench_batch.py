"""Batch and sequential fact edits on the demo, as `memedit edit --requests F [--sequential]` makes them.

    python benchmarks/bench_batch.py [--n 20] [--seed 0] [--sequential] [--no-locality] [--smoke]

n random demo facts, each rewritten to a random other object of its relation, in one batch (default) or one by one;
with the locality sample, the guard and repairs as `memedit edit` uses them (`--no-locality`: without, for the cost).
Prints one JSON line: how many new answers hold at the end (mean per-token log-prob, new > old) and are the exact
greedy continuation, the accuracy change on 1,500 untouched facts' first wordings, CPU seconds a request, the
statuses, and the first edits' steps, rows and collateral.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memedit  # noqa: E402
from memedit.editing import background as B  # noqa: E402
from memedit.editing.locality import Locality, sample_for  # noqa: E402
from memedit.editing.sparse_ft import EditConfig, EditRequest, run_edits  # noqa: E402
from memedit.tracing.targets import score  # noqa: E402
from memedit.world.facts import world_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20, help="requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sequential", action="store_true", help="one edit per request (default: one batch)")
    ap.add_argument("--no-locality", action="store_true", help="no locality sample: no guard, no repairs")
    ap.add_argument("--smoke", action="store_true", help="2 requests, 100 untouched facts (seconds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, n_untouched = (2, 100) if args.smoke else (args.n, 1500)
    model = memedit.load()
    world = world_of(model)
    bg = B.get(model)
    rng = random.Random(args.seed)
    objects = {r.name: r.objects for r in world.relations}
    reqs = []
    for f in rng.sample(world.facts, n):
        r = EditRequest.from_fact(f)
        r.target_new = rng.choice([o for o in objects[f.relation] if o != f.target_true])
        reqs.append(r)
    edited = {r.id for r in reqs}
    untouched = [(f.training_prompts[0], f.target_true) for f in world.facts if f.id not in edited]
    rng.shuffle(untouched)
    untouched = untouched[:n_untouched]

    def accuracy() -> float:
        return sum(s.greedy for s in score(model, *zip(*untouched, strict=True))) / len(untouched)

    before = accuracy()
    cpu0 = time.process_time()
    loc = None if args.no_locality else Locality(model, sample_for(model, stored=bg.locality))
    res = run_edits(model, reqs, bg, EditConfig(), sequential=args.sequential, keep_facts=world.facts,
                    subjects=[f.subject for f in world.facts], locality=loc)
    cpu = time.process_time() - cpu0
    after = accuracy()
    prompts = [r.rewrite_prompt for r in reqs]
    new = score(model, prompts, [r.target_new for r in reqs])
    old = score(model, prompts, [r.target_true for r in reqs])
    status: dict[str, int] = {}
    for r in res:
        status[r.status] = status.get(r.status, 0) + 1
    print(json.dumps({
        "n": n, "sequential": args.sequential, "locality": loc is not None,
        "hold": sum(a.mean_logprob > b.mean_logprob for a, b in zip(new, old, strict=True)),
        "exact": sum(a.greedy for a in new), "untouched_before": before, "untouched_after": after,
        "untouched_change_pts": round(100 * (after - before), 2), "cpu_seconds_per_request": round(cpu / n, 2),
        "status": status, "steps": [r.steps for r in res][:8],
        "rows": [sum(len(v) for v in r.slots.values()) for r in res][:8],
        "collateral": [r.collateral.to_json() if r.collateral else None for r in res][:3]}))


if __name__ == "__main__":
    main()
