"""Lifelong editing of a model memedit did not train: N sequential rewrites through `memedit edit --sequential`.

    python benchmarks/bench_foreign_lifelong.py [--n 100] [--seed 0] [--smoke]

The foreign fixture (tests/foreign_model.py: lingua layout, SentencePiece, one shared 4,096-slot bf16 table, 160
people x 2 relations, its own forward) is converted, given `memedit background corpus.txt` (its training text:
the locality sample), and edited by ONE `memedit edit --requests F --sequential --json` process, without a facts
file: n facts at random (seed), each rewritten to another object of its relation. Judged afterwards by the
fixture's own forward on the `--format lingua` export: edits holding (mean per-token log-prob of the new object >
the old one's, whole targets), exact (greedy continuation), and exact-match accuracy on the training prompts of
the facts of people never edited. Prints one JSON line (with the statuses and CPU seconds a request).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import foreign_model as fm  # noqa: E402


def memedit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memedit_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="2 edits (seconds): does it run")
    args = ap.parse_args()
    n = 2 if args.smoke else args.n
    facts = fm.read_facts(fm.FIXTURE)
    rng = random.Random(args.seed)
    objects: dict[str, set[str]] = {}
    for f in facts:
        objects.setdefault(f["relation"], set()).add(f["target_true"])
    picked = rng.sample(facts, n)
    reqs = [{"prompt": f["prompt"], "subject": f["subject"], "target_true": f["target_true"],
             "target_new": rng.choice(sorted(objects[f["relation"]] - {f["target_true"]}))} for f in picked]
    edited = {r["subject"] for r in reqs}
    others = [(p, f["target_true"]) for f in facts if f["subject"] not in edited for p in fm.prompts_of(f)]
    state, params, sp = fm.load_foreign(fm.FIXTURE)
    before = sum(fm.exact_matches(state, params, sp, others)) / len(others)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for cmd in (("convert", tmp / "m", "--model", fm.FIXTURE),
                    ("background", fm.FIXTURE / "corpus.txt", "-m", tmp / "m")):
            r = memedit(*cmd)
            if r.returncode:
                raise SystemExit(f"memedit {cmd[0]} failed: {r.stderr.strip()}")
        (tmp / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
        c0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        r = memedit("edit", "-m", tmp / "m", "--requests", tmp / "req.jsonl", "--sequential", "--json")
        c1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
        if r.returncode not in (0, 1):
            raise SystemExit(f"memedit edit failed: {r.stderr.strip()}")
        res = json.loads(r.stdout)
        r = memedit("convert", tmp / "lingua", "--format", "lingua", "--model", tmp / "m")
        if r.returncode:
            raise SystemExit(f"memedit convert --format lingua failed: {r.stderr.strip()}")
        state, params, _ = fm.load_foreign(tmp / "lingua")
    prompts = [r["prompt"].replace("{}", r["subject"]) for r in reqs]
    new = fm.mean_logprobs(state, params, sp, list(zip(prompts, [r["target_new"] for r in reqs], strict=True)))
    old = fm.mean_logprobs(state, params, sp, list(zip(prompts, [r["target_true"] for r in reqs], strict=True)))
    exact = fm.exact_matches(state, params, sp, list(zip(prompts, [r["target_new"] for r in reqs], strict=True)))
    after = sum(fm.exact_matches(state, params, sp, others)) / len(others)
    print(json.dumps({
        "n": n, "seed": args.seed, "holding": sum(a > b for a, b in zip(new, old, strict=True)) / n,
        "exact": sum(exact) / n, "others_before": before, "others_after": after, "others_n": len(others),
        "others_kept": after / before if before else None, "summary": res["summary"],
        "cpu_seconds_per_edit": round((c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / n, 2),
        "wall_seconds": round(wall, 1)}))


if __name__ == "__main__":
    main()
