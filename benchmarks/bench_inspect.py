"""Acceptance and timing of `memedit inspect` on the bundled demo model.

1. Top-attributed vs random slots: for facts the model answers, drop the 10 top-attributed selected slots, or 10
   selected slots at random, at the answer position; how often does the target's probability go down?
2. Wall time of the commands a user runs, end to end (new process each time, median of --repeat runs).

Run: nice -n 10 .venv/bin/python benchmarks/bench_inspect.py [--facts 300] [--repeat 3] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall(cmd: list[str], repeat: int) -> float:
    """Median wall seconds of running ``cmd`` (each run must succeed)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=300, help="facts sampled evenly from the demo world")
    ap.add_argument("--drop", type=int, default=10, help="slots dropped per fact")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    ap.add_argument("--smoke", action="store_true", help="5 facts, each command once: does it run (not a measurement)")
    args = ap.parse_args()
    if args.smoke:
        args.facts, args.repeat = 5, 1

    import torch

    import memedit
    from memedit.tracing.trace import top_vs_random
    from memedit.world.facts import world_of

    torch.set_num_threads(1)  # tiny batches: threads only add waiting on a busy machine
    model = memedit.load(args.model)
    world = world_of(model)
    facts = world.facts[:: max(1, len(world.facts) // args.facts)][: args.facts]
    t0 = time.perf_counter()
    r = top_vs_random(model, facts, n_drop=args.drop, seed=args.seed)
    secs = time.perf_counter() - t0
    n = r["facts_answered"]
    print(f"## top-{args.drop} vs random-{args.drop} selected slots dropped at the answer position")
    print(f"facts sampled {r['facts_tried']}, answered (target ranked 1st) {n}, {secs:.1f}s")
    print(f"{'':28s}{'top-attributed':>16s}{'random':>12s}")
    print(f"{'P(target) lowered, facts':28s}{r['lowered_top']:>16.1%}{r['lowered_random']:>12.1%}")
    print(f"{'mean P(target) after drop':28s}{r['mean_prob_top']:>16.3f}{r['mean_prob_random']:>12.3f}"
          f"   (before: {r['mean_prob']:.3f})")
    flipped_top = sum(x["prob_top"] < 0.5 for x in r["rows"]) / max(n, 1)
    flipped_rand = sum(x["prob_random"] < 0.5 for x in r["rows"]) / max(n, 1)
    print(f"{'P(target) < 0.5 after drop':28s}{flipped_top:>16.1%}{flipped_rand:>12.1%}")

    exe = shutil.which("memedit", path=str(Path(sys.executable).parent)) or "memedit"
    f = facts[0]
    at = ["--model", args.model] if args.model else []
    prompt = f.prompt.format(f.subject)
    runs = [
        ("memedit --help", [exe, "--help"]),
        (f'memedit inspect "{prompt}" --target {f.target_true}',
         [exe, "inspect", prompt, "--target", f.target_true, *at]),
        ("memedit inspect ... --json", [exe, "inspect", prompt, "--target", f.target_true, "--json", *at]),
        (f"memedit inspect --fact {f.id}", [exe, "inspect", "--fact", f.id, *at]),
        (f'memedit trace-causal ... --subject {f.subject}',
         [exe, "trace-causal", prompt, "--subject", f.subject, "--target", f.target_true, *at]),
        ('python -c "import torch"', [sys.executable, "-c", "import torch"]),
    ]
    print(f"\n## wall time, end to end (median of {args.repeat})")
    for label, cmd in runs:
        print(f"{wall(cmd, args.repeat):7.2f}s  {label}")


if __name__ == "__main__":
    main()
