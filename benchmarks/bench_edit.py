"""Fact-edit benchmark on the demo world: memedit's sparse memory finetuning against three baselines.

    python benchmarks/bench_edit.py [--model PATH] [--n 100] [--json out.json] [--smoke]

Methods (same steps, same early stop):
  memedit      the defaults of `memedit edit`: rows read at every position ranked by TF-IDF against the background
               `memedit edit` uses, adaptive rows, SGD, the subject's other facts kept in the loss (keep_for)
  counts       top-t value rows by access counts alone (no IDF), otherwise identical
  full-ft      every parameter of the model trained (AdamW, the usual choice for full finetuning; lr 3e-5, the
               smallest of {1e-3, 1e-4, 3e-5} tried that still made every edit, since a larger one forgot more)
  rome         a ROME-style rank-one edit of the last memory layer's value_proj (benchmarks/baselines.py), the
               nearest dense-editing peer: no steps or rows in common with the others

Two runs per method, on the same n facts (a fixed random sample), each rewritten to its ``target_new``:
  single       each edit made on the original model, measured right after it, then undone
  sequential   the n edits one after another, each measured right after it was made; at the end: how many still
               hold, and the accuracy change on every untouched fact of the world (all training phrasings)
One untimed warm-up edit (a fact outside the sample) runs first, so the timings exclude torch's first-call costs.
Forgetting right after each edit is measured on a fixed sample of 1000 other facts' prompts (for speed).
For memedit, the sequential run goes through a real model folder (patch.apply per edit, then patch.revert of every
edit in reverse order) and checks that model.safetensors comes back byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memedit  # noqa: E402
from memedit.editing import background as B  # noqa: E402
from memedit.editing.locality import Locality  # noqa: E402
from memedit.editing.sparse_ft import EditConfig, EditRequest, Forgetting, Preserve, edit, keep_for, measure  # noqa: E402
from memedit.world.evaluate import accuracy  # noqa: E402
from memedit.world.facts import world_of  # noqa: E402


def methods(args) -> dict[str, EditConfig]:
    base = EditConfig()
    if args.top_t:
        base.top_t = args.top_t
    if args.lr:
        base.lr = args.lr
    if args.steps:
        base.steps = args.steps
    return {
        "memedit": base,
        "counts": EditConfig(**{**base.__dict__, "ranking": "counts"}),
        "full-ft": EditConfig(**{**base.__dict__, "train_all": True, "optimizer": "adamw", "lr": args.ft_lr}),
        "rome": ROME,
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])


ROME = "rome"  # a method name, not an EditConfig: benchmarks/baselines.py
C_INV: list = []  # ROME's inverse key covariance, computed once per run
WORLD: list = []  # the world's facts: the subject's other facts are kept in the loss (`memedit edit --keep-subject`)


def apply_edit(model, req: EditRequest, bg, cfg, commit=None):
    """Make one edit and apply it (in memory, or through ``commit``); returns the EditResult."""
    from memedit.editing.patch import write_rows
    from memedit.editing.sparse_ft import EditResult

    if cfg == ROME:
        from baselines import rome_edit

        t0 = time.perf_counter()
        rome_edit(model, req, max(model.memory_layers), C_INV[0])
        return EditResult(None, {}, 0, float("nan"), time.perf_counter() - t0)
    preserve = None
    if not cfg.train_all:
        req.keep = keep_for(req, WORLD)
        if LOCALITY:  # as `memedit edit` does: repairs on the locality sample when the edit changed it
            loc = LOCALITY[0]
            preserve = Preserve(loc, loc.allowed([req.subject]) & ~loc.held_out, cfg)
    res = edit(model, [req], bg, cfg, preserve=preserve)
    if res.patch is not None:
        (commit or (lambda p: write_rows(model, p)))(res.patch)
    return res


def summarise(rows: list[dict]) -> dict:
    out = {}
    for k in ("efficacy", "paraphrase", "paraphrase_heldout", "neighborhood", "score"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    out["forgetting_pts"] = 100 * statistics.mean(r["forgetting"] for r in rows)
    secs = [r["seconds"] for r in rows]
    out["seconds_median"], out["seconds_max"] = statistics.median(secs), max(secs)
    out["rows_trained_mean"] = statistics.mean(r["rows"] for r in rows)
    return out


def single(model, facts, others, bg, cfg) -> dict:
    state = snapshot(model)
    forget = Forgetting(model, others, sample=FORGET_SAMPLE)
    base_correct = forget.correct.clone()
    rows = []
    for f in facts:
        req = EditRequest.from_fact(f)
        res = apply_edit(model, req, bg, cfg)
        m = measure(model, req)
        m["forgetting"] = forget.update()["change"]
        m["seconds"], m["rows"] = res.seconds, (res.patch.n_rows if res.patch else -1)
        rows.append(m)
        restore(model, state)  # exact, so the original predictions come back too
        forget.correct = base_correct.clone()
    return summarise(rows)


def sequential(model, facts, others, bg, cfg, folder: Path | None) -> dict:
    from memedit.editing.patch import apply, revert

    state = snapshot(model)
    untouched_p = [p for f in others for p in f.training_prompts]
    untouched_t = [f.target_true for f in others for _ in f.training_prompts]
    acc0 = accuracy(model, untouched_p, untouched_t)
    forget = Forgetting(model, others, sample=FORGET_SAMPLE)
    apply_secs: list[float] = []

    def commit(p):
        t0 = time.perf_counter()
        apply(model, p)
        apply_secs.append(time.perf_counter() - t0)

    commit = commit if folder is not None else None
    rows, reqs, patches = [], [], []
    for f in facts:
        req = EditRequest.from_fact(f)
        res = apply_edit(model, req, bg, cfg, commit)
        m = measure(model, req)
        m["forgetting"] = forget.update()["change"]
        m["seconds"], m["rows"] = res.seconds, (res.patch.n_rows if res.patch else -1)
        rows.append(m)
        reqs.append(req)
        patches.append(res.patch)
    out = summarise(rows)
    out["still_hold_at_end"] = statistics.mean(measure(model, r)["efficacy"] for r in reqs)
    out["untouched_accuracy_before"] = acc0
    out["untouched_accuracy_after"] = accuracy(model, untouched_p, untouched_t)
    out["untouched_change_pts"] = 100 * (out["untouched_accuracy_after"] - acc0)
    if folder is not None:
        out["apply_to_folder_seconds_median"] = statistics.median(apply_secs)
        t0 = time.perf_counter()
        for p in reversed(patches):
            revert(model, p.id)
        out["revert_all_seconds"] = time.perf_counter() - t0
        out["revert_all_byte_identical"] = (folder / "model.safetensors").read_bytes() == ORIGINAL_BYTES[0]
    restore(model, state)
    return out


ORIGINAL_BYTES: list[bytes] = []
LOCALITY: list[Locality] = []  # the locality sample `memedit edit` would use (the background's)
FORGET_SAMPLE = 1000  # other facts' prompts that measure forgetting after each edit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the bundled demo model)")
    ap.add_argument("--n", type=int, default=100, help="facts to edit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-t", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--ft-lr", type=float, default=3e-5, help="AdamW learning rate of the full-finetuning baseline")
    ap.add_argument("--methods", default="memedit,counts,full-ft,rome")
    ap.add_argument("--runs", default="single,sequential")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--smoke", action="store_true", help="1 fact, 50 other facts: does it run (not a measurement)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        global FORGET_SAMPLE
        args.n, FORGET_SAMPLE = 1, 20

    model = memedit.load(args.model)
    world = world_of(model)
    rng = random.Random(args.seed)
    facts = rng.sample(world.facts, args.n)
    WORLD[:] = world.facts
    edited = {f.id for f in facts}
    others = [f for f in world.facts if f.id not in edited][: 50 if args.smoke else None]
    t0 = time.perf_counter()
    bg = B.get(model)  # what `memedit edit` uses on the bundled model: the stored statistics, or computed in memory
    bg_seconds = time.perf_counter() - t0
    print(f"model {model.source}: {len(world.facts)} facts; background {bg.n_batches} batches in {bg_seconds:.1f}s")

    cfgs = {k: v for k, v in methods(args).items() if k in args.methods.split(",")}
    edit(model, [EditRequest.from_fact(others[0])], bg, EditConfig())  # warm-up, untimed; the model is unchanged
    if ROME in cfgs:
        from baselines import key_covariance

        texts = world.training_sentences()
        C_INV[:] = [key_covariance(model, max(model.memory_layers), texts[:: max(1, len(texts) // 4000)])]
    results: dict = {"n": args.n, "background_seconds": bg_seconds,
                     "configs": {k: getattr(v, "__dict__", v) for k, v in cfgs.items()}}
    tmp = Path(tempfile.mkdtemp(prefix="bench_edit."))
    try:
        for run in args.runs.split(","):
            for name, cfg in cfgs.items():
                t0 = time.perf_counter()
                if run == "single":  # each edit on the original model: the locality sample's reference holds
                    LOCALITY[:] = [Locality(model, bg.locality)] if bg.locality else []
                    res = single(model, facts, others, bg, cfg)
                    LOCALITY.clear()
                else:
                    folder = None
                    if name == "memedit":  # the real path: a model folder, apply per edit, revert every edit
                        from memedit.storage.checkpoint import save

                        folder = save(model, tmp / "model")
                        ORIGINAL_BYTES[:] = [(folder / "model.safetensors").read_bytes()]
                        model = memedit.load(folder)
                    res = sequential(model, facts, others, bg, cfg, folder)
                res["wall_seconds"] = time.perf_counter() - t0
                results.setdefault(run, {})[name] = res
                print(f"[{run}] {name}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                        for k, v in res.items()}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:6.1f}%"

    for run in ("single", "sequential"):
        if run not in results:
            continue
        names = list(results[run])
        print(f"\n{run} edits (n={results['n']})".ljust(34) + "".join(f"{n:>12}" for n in names))
        keys = ["efficacy", "paraphrase", "paraphrase_heldout", "neighborhood", "score", "forgetting_pts",
                "seconds_median", "seconds_max", "rows_trained_mean"]
        if run == "sequential":
            keys += ["still_hold_at_end", "untouched_change_pts", "apply_to_folder_seconds_median"]
        for k in keys:
            cells = []
            for n in names:
                v = results[run][n].get(k)
                if k in ("efficacy", "paraphrase", "paraphrase_heldout", "neighborhood", "still_hold_at_end"):
                    cells.append(pct(v))
                elif v is None:
                    cells.append("-")
                else:
                    cells.append(f"{v:7.3f}")
            print(f"  {k:32}" + "".join(f"{c:>12}" for c in cells))
        if run == "sequential" and "full-ft" in names and "memedit" in names:
            a, b = results[run]["memedit"]["untouched_change_pts"], results[run]["full-ft"]["untouched_change_pts"]
            print(f"  forgetting on untouched facts: memedit {a:+.2f} pts vs full finetuning {b:+.2f} pts")
        if run == "sequential" and "memedit" in names and "revert_all_byte_identical" in results[run]["memedit"]:
            print("  revert of every memedit edit byte-identical: "
                  f"{results[run]['memedit']['revert_all_byte_identical']}")


if __name__ == "__main__":
    main()
