"""Lifelong editing (issue 24): 50 sequential edits through `run_edits` as `memedit edit --sequential` makes them
(locality sample, guard, preservation of the sample and of earlier edits' answers, consolidation passes) on the
small BPE fixture (tests/bpe_world.py: 300 facts, one 4,096-slot table: 50 edits are a sixth of its facts).

benchmarks/bench_continual.py measures the same on the demo up to 1,000 edits (README, "Continual editing").
"""

from __future__ import annotations

import random

import torch

from memedit.editing import background as B
from memedit.editing.locality import Locality, draw_sample
from memedit.editing.sparse_ft import EditConfig, EditRequest, run_edits
from memedit.tracing.targets import score

from .bpe_world import bpe_model

N_EDITS = 50
CONSOLIDATE_EVERY = 10  # a consolidation pass after every 10 committed edits (the default, 50, is for longer runs)


def test_fifty_sequential_edits_hold_and_keep_untouched_facts(tmp_path):
    torch.manual_seed(0)
    model, _, world = bpe_model(tmp_path)
    bg = B.compute(model, world.training_sentences(), 32, 1000, corpus="the fixture world")
    rng = random.Random(0)
    objects = {r.name: r.objects for r in world.relations}
    reqs = []
    for f in rng.sample(world.facts, N_EDITS):
        req = EditRequest.from_fact(f)
        req.target_new = rng.choice([o for o in objects[f.relation] if o != f.target_true])
        reqs.append(req)
    edited = {r.id for r in reqs}
    untouched = [(p, f.target_true) for f in world.facts if f.id not in edited for p in f.training_prompts]

    def accuracy() -> float:
        return sum(s.greedy for s in score(model, *zip(*untouched, strict=True))) / len(untouched)

    before = accuracy()
    loc = Locality(model, draw_sample(model, world.training_sentences()))
    cfg = EditConfig(consolidate_every=CONSOLIDATE_EVERY)
    big = Locality(model, draw_sample(model, world.training_sentences(), cfg.consolidate_tokens, seed=1))
    res = run_edits(model, reqs, bg, cfg, keep_facts=world.facts,
                    subjects=[f.subject for f in world.facts], locality=loc, consolidation=big)
    after = accuracy()
    rw = [r.rewrite_prompt for r in reqs]
    new = score(model, rw, [r.target_new for r in reqs])
    old = score(model, rw, [r.target_true for r in reqs])
    hold = sum(a.mean_logprob > b.mean_logprob for a, b in zip(new, old, strict=True)) / N_EDITS
    drop = 100 * (before - after)
    status = {s: sum(r.status == s for r in res) for s in {r.status for r in res}}
    passes = [r.consolidation for r in res if r.consolidation is not None]
    print(f"untouched {before:.1%} -> {after:.1%} ({drop:.1f} pts), edits holding {hold:.0%}, {status}")
    for p in passes:
        print("  consolidation", p.to_json())
    committed = status.get("committed", 0)  # a pass every 10 committed edits, and one after the run's last
    assert len(passes) == -(-committed // CONSOLIDATE_EVERY), (len(passes), committed)
    assert any(p.committed for p in passes)
    for p in passes:  # a committed pass gave back more than it took, and lost no answer that held
        if p.committed:
            assert p.flipped_after + p.answers_lost_after < p.flipped_before + p.answers_lost_before, p
            assert p.answers_lost_after <= p.answers_lost_before, p
    assert before >= 0.95
    # Measured (2026-12-04): -0.3 points, 82 % holding (8 of 50 refused by the guard, 7 of them for collateral over
    # 2 %) with passes of up to 60 steps and a repair round; with 30 steps and no repair round -1.8 points and 94 %;
    # -4.1 when a pass left out every text naming an edited subject (all 62 untouched prompts that broke were other
    # facts of edited subjects), -5.2 with no pass after the last edit, -8.0 without consolidation. On this 4,096-slot
    # table an edit's rows are up to a quarter of the table; a refused edit leaves the model as it was.
    assert hold >= 0.78, hold
    assert drop <= 1.5, drop
    assert status.get("committed", 0) >= 39, status
