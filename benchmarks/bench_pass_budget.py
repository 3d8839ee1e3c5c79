"""How much one consolidation pass gives back for its length (issue 24): N sequential edits on the demo without
passes, then ONE pass over them with each step budget, every budget from the same model.

    python benchmarks/bench_pass_budget.py [--n 100] [--budgets 60,120,240] [--tokens 1000000] [--smoke]

The pass is memedit/editing/consolidate.py's, on ``--tokens`` tokens of the demo world's training sentences (more
than it holds: all 17,100 of them) against the model before the first edit. Prints, per budget: the changed
sample sequences before and after the pass, lost edit answers before and after, and the pass's CPU seconds
(1 thread). The model is not changed by a trial (the pass returns a patch; nothing is applied).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_continual  # noqa: E402

import memedit  # noqa: E402
from memedit.editing import background as B  # noqa: E402
from memedit.editing import sparse_ft as S  # noqa: E402
from memedit.editing.locality import Locality, draw_sample, sample_for  # noqa: E402
from memedit.world.facts import world_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--budgets", default="60,120,240")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="2 edits, budgets 1,2, 2,000 tokens: does it run")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.budgets, args.tokens = 2, "1,2", 2000
    budgets = [int(b) for b in args.budgets.split(",") if b]
    torch.set_num_threads(1)
    model = memedit.load(args.model)
    world = world_of(model)
    reqs = bench_continual.requests(world, args.n, args.seed)
    bg = B.get(model)
    loc = Locality(model, sample_for(model, stored=bg.locality))
    big = Locality(model, draw_sample(model, world.training_sentences(), args.tokens, seed=1))
    print(f"{args.n} sequential edits on {model.source}, then one pass on {len(big.texts):,} sequences; load "
          f"average {open('/proc/loadavg').read().split()[0]}", flush=True)
    one_pass = S.consolidate
    rows = []

    def trials(model, sample, changed, named, kept, cfg, seed, message=""):
        first = None
        for steps in budgets:
            t = time.process_time()
            rep = one_pass(model, sample, changed, named, kept, replace(cfg, consolidate_steps=steps), seed, message)
            rows.append({"budget": steps, "cpu_seconds": round(time.process_time() - t, 1), **rep.to_json()})
            print(json.dumps(rows[-1]), flush=True)
            first = rep if first is None else first
        return first  # the run goes on with the first budget's pass

    S.consolidate = trials  # run_edits calls it once: after the run's last edit (a pass every n edits)
    S.run_edits(model, reqs, bg, S.EditConfig(consolidate_every=args.n), keep_facts=world.facts,
                subjects=[f.subject for f in world.facts], locality=loc, consolidation=big)
    print("\nbudget  changed sequences before -> after  lost answers before -> after  CPU s")
    for r in rows:
        print(f"{r['budget']:6d}  {r['flipped_before']:8d} -> {r['flipped_after']:<8d}  {r['answers_lost_before']:13d}"
              f" -> {r['answers_lost_after']:<13d}  {r['cpu_seconds']:.1f}")


if __name__ == "__main__":
    main()
