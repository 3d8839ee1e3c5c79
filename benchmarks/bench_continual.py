"""Continual editing: N sequential fact edits on the demo, every method in the same run, a forgetting curve.

    python benchmarks/bench_continual.py [--model PATH] [--n 1000] [--every 50] [--methods a,b,...]
                                         [--json out.json] [--plot curve.png] [--untouched N] [--smoke]

Each method starts from the same model and makes the same N edits one after another: facts drawn at random (seed
0), each rewritten to a RANDOM other object of its relation (not the world's ``target_new``), the old answer being
the fact's true object. After every ``--every`` edits, on the model as it stands:
  holding       edits made so far whose new target is still preferred on the rewrite prompt (mean per-token
                log-probability of the new target > that of the old one: whole targets, as CounterFact compares)
  exact         edits made so far whose rewrite prompt still decodes greedily to the whole new target
  paraphrase    the same preference on the edited facts' other phrasings (training and held-out)
  neighborhood  prompts about other subjects of the edited facts' relations keep the old object
  untouched     exact-match accuracy on the training phrasings of every fact not edited (``--untouched N``: a fixed
                sample of N prompts instead), and its drop from the start
Methods (memedit's strategies are options of ``memedit edit``; see EditConfig):
  no-consolidation   memedit without its consolidation passes (EditConfig.consolidate_every = 0)
  memedit            the `memedit edit` defaults: rows read at every prompt position ranked by TF-IDF, adaptive rows
                     (128 first, doubled every 10 steps while the edit does not hold, up to 1,024; at most 200 steps
                     of SGD with momentum 0.9, lr 10, until every new-target token has p > 1/2), the rows that
                     the prompt reads at the new target about 8 other subjects left alone (--contrast 8),
                     the subject's other facts kept in the loss (--keep-subject: the world is known here)
  no-contrast        memedit without --contrast (rows that the prompt reads about other subjects may be trained)
  answer             rows read at the answer positions only, nothing kept (the defaults before issue 13's demo)
  protect            + rows that earlier edits trained are never trained again
  hot                + protect, and the background's 2 % most-read rows left alone
  fixed-128          128 rows per edit, at most 100 steps (memedit's defaults before continual editing)
  counts             fixed-128 ranked by access counts alone (no IDF)
  full-ft            every parameter trained (AdamW, lr 3e-5: the full-finetuning baseline of bench_edit.py)
  rome               a ROME-style rank-one edit of the last memory layer's value_proj (benchmarks/baselines.py)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memedit  # noqa: E402
from memedit.editing import background as B  # noqa: E402
from memedit.editing.locality import Locality, draw_sample, mentions, sample_for  # noqa: E402
from memedit.editing.patch import write_rows  # noqa: E402
from memedit.editing.sparse_ft import EditConfig, EditRequest, answers_of, edit, keep_for, run_edits  # noqa: E402
from memedit.tracing.targets import score  # noqa: E402
from memedit.world.facts import world_of  # noqa: E402

FIXED = {"adaptive": False, "top_t": 128, "steps": 100, "lr": 5.0, "momentum": 0.0,
         "contrast": 0}  # the defaults before continual
# editing
STRATEGIES = {
    "memedit": {"keep": True},
    "no-contrast": {"keep": True, "contrast": 0},
    "answer": {"positions": "answer", "contrast": 0},
    "protect": {"protect": "edits", "keep": True},
    "hot": {"protect": "hot", "keep": True},
    "fixed-128": FIXED,
    "counts": {**FIXED, "ranking": "counts"},
    "full-ft": {"adaptive": False, "steps": 100, "train_all": True, "optimizer": "adamw", "lr": 3e-5},
}
METHODS = list(STRATEGIES) + ["no-consolidation", "rome", "grace"]


consolidation_texts: list[str] = []  # memedit's consolidation sample: training sentences (seed 1), set in main
consolidation_set: set[str] = set()


def requests(world, n: int, seed: int) -> list[EditRequest]:
    """n edits drawn with replacement from the world's facts (a fact drawn again is edited again), each to a random
    object of its relation other than the fact's answer at that point (its true object, or its last edit's)."""
    rng = random.Random(seed)
    objects = {r.name: r.objects for r in world.relations}
    current: dict[str, str] = {}
    out = []
    for _ in range(n):
        f = rng.choice(world.facts)
        req = EditRequest.from_fact(f)
        req.target_true = current.get(f.id, f.target_true)
        req.target_new = rng.choice([o for o in objects[f.relation] if o != req.target_true])
        current[f.id] = req.target_new
        out.append(req)
    return out


def prefers(model, prompts: list[str], first: list[str], second: list[str]) -> list[bool]:
    """[mean per-token log P(first[i]) > mean per-token log P(second[i])] after prompts[i]."""
    if not prompts:
        return []
    n = len(prompts)
    sc = score(model, prompts * 2, first + second)
    return [a.mean_logprob > b.mean_logprob for a, b in zip(sc[:n], sc[n:], strict=True)]


def checkpoint(model, made: list[EditRequest], untouched: tuple[list[str], list[str]], facts) -> dict:
    """The metrics of the module docstring on the model as it stands; a fact edited more than once is judged by its
    latest edit (new answer against the answer it replaced)."""
    latest = list({r.id: r for r in made}.values())
    rw = [r.rewrite_prompt for r in latest]
    hold = prefers(model, rw, [r.target_new for r in latest], [r.target_true for r in latest])
    exact = [s.greedy for s in score(model, rw, [r.target_new for r in latest])]
    tp = [(p, r) for r in latest for p in r.paraphrases]
    para = prefers(model, [p for p, _ in tp], [r.target_new for _, r in tp], [r.target_true for _, r in tp])
    hp = [(p, r) for r in latest for p in r.heldout_paraphrases]
    held = prefers(model, [p for p, _ in hp], [r.target_new for _, r in hp], [r.target_true for _, r in hp])
    true = {f.id: f.target_true for f in facts}
    edited = sorted({r.subject for r in latest if r.subject})
    nb = [(p, r) for r in latest for p in r.neighborhood if not mentions(p, edited)]  # other subjects, never edited
    neigh = prefers(model, [p for p, _ in nb], [true[r.id] for _, r in nb], [r.target_new for _, r in nb])
    correct = [s.greedy for s in score(model, *untouched)]
    acc = statistics.mean(correct) if correct else float("nan")
    outside = [c for c, p, t in zip(correct, *untouched, strict=True) if f"{p} {t}." not in consolidation_set]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"edits": len(made), "facts_edited": len(latest), "holding": mean(hold), "exact": mean(exact),
            "paraphrase": mean(para), "paraphrase_heldout": mean(held), "neighborhood": mean(neigh),
            "neighborhood_n": len(nb), "untouched": acc, "untouched_n": len(untouched[0]),
            "untouched_outside": mean(outside), "untouched_outside_n": len(outside)}


def run(method: str, base_state: dict, model, reqs, bg, every: int, untouched_of, c_inv, facts,
        saved=lambda partial: None, consolidate_every: int | None = None) -> dict:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(base_state[k])
    made: list[EditRequest] = []
    curve, secs, cpu, rows, status = [], [], [], [], {}
    start = checkpoint(model, [], untouched_of(set()), facts)
    curve.append(start)
    clock = [time.perf_counter(), time.process_time()]

    def after_edit(req: EditRequest, n_rows: int) -> None:
        """Book-keeping after each edit: its cost (the checkpoints are not counted) and, every ``every`` edits,
        the metrics."""
        secs.append(time.perf_counter() - clock[0])
        cpu.append(time.process_time() - clock[1])  # CPU seconds of this process: what load inflates less
        rows.append(n_rows)
        made.append(req)
        n = len(made)
        if n % every == 0 or n == len(reqs):
            c = checkpoint(model, made, untouched_of({r.id for r in made}), facts)
            c["untouched_drop_pts"] = 100 * (start["untouched"] - c["untouched"])
            inside = c["untouched_outside"] is None  # the consolidation sample holds every untouched prompt
            c["untouched_outside_drop_pts"] = None if inside else 100 * (start["untouched_outside"]
                                                                         - c["untouched_outside"])
            c["seconds_per_edit_median"] = statistics.median(secs)
            c["cpu_seconds_per_edit_median"] = statistics.median(cpu)
            c["cpu_seconds_per_edit_mean"] = statistics.mean(cpu)  # consolidation passes amortised
            c["status"] = dict(status)
            curve.append(c)
            print(f"  {method:17s} {n:5d} edits: holding {c['holding']:.1%}, exact {c['exact']:.1%}, paraphrase "
                  f"{c['paraphrase']:.1%} (held-out {c['paraphrase_heldout']:.1%}), neighborhood "
                  f"{c['neighborhood']:.1%}, untouched {c['untouched']:.1%} (-{c['untouched_drop_pts']:.1f} pts; "
                  + ("every prompt in the consolidation sample), " if inside else
                     f"outside the consolidation sample -{c['untouched_outside_drop_pts']:.1f}), ")
                  + f"{statistics.median(secs):.2f} s/edit ({statistics.median(cpu):.2f} s CPU, mean "
                  f"{statistics.mean(cpu):.2f}) {status}", flush=True)
            saved({"curve": curve, "seconds_median": statistics.median(secs),  # a killed run keeps its curve
                   "cpu_seconds_median": statistics.median(cpu)})
        clock[:] = [time.perf_counter(), time.process_time()]

    if method in ("memedit", "no-consolidation"):  # what `memedit edit --sequential` does: guard, locality
        # sample, earlier answers kept, consolidation passes on a larger sample
        cfg = EditConfig() if method == "memedit" else EditConfig(consolidate_every=0)
        if method == "memedit" and consolidate_every is not None:
            cfg = EditConfig(consolidate_every=consolidate_every)
        loc = Locality(model, sample_for(model, stored=bg.locality))
        big = Locality(model, consolidation_texts) if cfg.consolidate_every else None
        passes: list[dict] = []
        clock[:] = [time.perf_counter(), time.process_time()]

        def booked(group, res) -> None:
            status[res.status] = status.get(res.status, 0) + 1
            if res.consolidation is not None:
                passes.append({"after": len(made) + 1, **res.consolidation.to_json()})
                print(f"    consolidation: {passes[-1]}", flush=True)
            after_edit(group[0], res.patch.n_rows if res.patch is not None else 0)

        run_edits(model, reqs, bg, cfg, keep_facts=facts, subjects=[f.subject for f in facts], locality=loc,
                  on_result=booked, consolidation=big)
        return {**_summary(curve, secs, cpu, rows), "consolidations": passes}
    if method == "grace":
        from baselines import Grace

        grace = Grace(model, max(model.memory_layers))
        clock[:] = [time.perf_counter(), time.process_time()]
        try:
            for req in reqs:
                grace.edit(req)
                after_edit(req, 0)
        finally:
            grace.remove()
        return _summary(curve, secs, cpu, rows)
    protect: dict[str, torch.Tensor] = {}
    answers: dict[str, str] = {}  # the answers earlier edits gave: kept facts are kept at those (keep_for)
    opts = dict(STRATEGIES.get(method, {}))
    keep = opts.pop("keep", False)
    cfg = EditConfig(**opts)
    for req in reqs:
        n_rows = 0
        if method == "rome":
            from baselines import rome_edit

            rome_edit(model, req, max(model.memory_layers), c_inv)
        else:
            req.keep = keep_for(req, facts, answers=answers) if keep else []
            res = edit(model, [req], bg, cfg, protect=protect if cfg.protect != "none" else None,
                       subjects=[f.subject for f in facts])
            if res.patch is not None:
                write_rows(model, res.patch, new=True)
                n_rows = res.patch.n_rows
            for name, ids in res.slots.items():
                protect[name] = torch.cat([protect.get(name, torch.empty(0, dtype=torch.long)), torch.tensor(ids)])
        answers.update(answers_of([req]))
        after_edit(req, n_rows)
    return _summary(curve, secs, cpu, rows)


def _summary(curve, secs, cpu, rows) -> dict:
    return {"curve": curve, "seconds_median": statistics.median(secs), "cpu_seconds_median": statistics.median(cpu),
            "rows_mean": statistics.mean(rows) if rows else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--untouched", type=int, default=0, help="sample this many untouched prompts (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--consolidate-every", type=int, default=None,
                    help="memedit's consolidation interval (default EditConfig's; 0: none); its result is named "
                         "memedit-every<N>")
    ap.add_argument("--consolidate-tokens", type=int, default=None,
                    help="the consolidation sample's size in tokens of the world's training sentences (default "
                         "EditConfig's; more than the world holds: all of them); its result is named memedit-tok<N>")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--replot", default=None, help="only plot (to --plot) the curves of these --json files, a,b,...")
    ap.add_argument("--smoke", action="store_true",
                    help="1 edit per method, 20 untouched prompts: does it run (not a measurement)")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.every, args.untouched = 1, 1, 20
    if args.replot:
        merged = {}
        for f in args.replot.split(","):
            merged.update(json.loads(Path(f).read_text()))
        report(merged, max(c["edits"] for r in merged.values() for c in r["curve"]))
        return plot(merged, args.plot or "forgetting.png")
    torch.set_num_threads(args.threads)
    model = memedit.load(args.model)
    world = world_of(model)
    reqs = requests(world, args.n, args.seed)
    bg = B.get(model)
    global consolidation_texts, consolidation_set
    consolidation_texts = draw_sample(model, world.training_sentences(),
                                      args.consolidate_tokens or EditConfig().consolidate_tokens, seed=1)
    consolidation_set = set(consolidation_texts)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pairs = [(f.id, p, f.target_true) for f in world.facts for p in f.training_prompts]
    if args.untouched:
        pairs = random.Random(1).sample(pairs, args.untouched)

    def untouched_of(edited: set[str]) -> tuple[list[str], list[str]]:
        keep = [(p, t) for fid, p, t in pairs if fid not in edited]
        return [p for p, _ in keep], [t for _, t in keep]

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)} (choose from {', '.join(METHODS)})")
    c_inv = None
    if "rome" in methods:
        from baselines import key_covariance

        texts = world.training_sentences()
        c_inv = key_covariance(model, max(model.memory_layers), texts[:: max(1, len(texts) // 4000)])
    print(f"{args.n} sequential edits on {model.source}, random new objects (seed {args.seed}); untouched prompts: "
          f"{len(pairs):,}; load average {open('/proc/loadavg').read().split()[0]}", flush=True)
    results: dict = {}

    def saved(m: str):
        def save(partial: dict) -> None:
            results[m] = partial
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
        return save

    for m in methods:
        name = m
        if m == "memedit" and args.consolidate_every is not None:
            name += f"-every{args.consolidate_every}"
        if m == "memedit" and args.consolidate_tokens:
            name += f"-tok{args.consolidate_tokens}"
        results[name] = run(m, base_state, model, reqs, bg, args.every, untouched_of, c_inv, world.facts, saved(name),
                            consolidate_every=args.consolidate_every)
    report(results, args.n)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


def report(results: dict, n: int) -> None:
    marks = sorted({c["edits"] for r in results.values() for c in r["curve"][1:]} & {100, 300, 1000, n})
    print(f"\n{'method':18s} " + " ".join(f"{'@' + str(m):>36s}" for m in marks))
    print(f"{'':18s} " + " ".join(f"{'hold/para/neigh/untouched-drop':>36s}" for _ in marks) + "   s/edit (wall, CPU)")
    for name, r in results.items():
        cells = []
        for m in marks:
            c = next((c for c in r["curve"] if c["edits"] == m), None)
            cells.append(f"{c['holding']:.1%}/{c['paraphrase']:.1%}/{c['neighborhood']:.1%}/"
                         f"{c['untouched_drop_pts']:+.1f}" if c else "-")
        print(f"{name:18s} " + " ".join(f"{x:>36s}" for x in cells)
              + f"   {r['seconds_median']:.2f}, {r.get('cpu_seconds_median', float('nan')):.2f}")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        xs = [c["edits"] for c in r["curve"]]
        ax.plot(xs, [100 * c["untouched"] for c in r["curve"]], marker="o", ms=3, label=name)
    ax.set_xlabel("sequential edits made")
    ax.set_ylabel("accuracy on untouched facts (%)")
    ax.set_title("forgetting curve (exact match of the whole answer)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
