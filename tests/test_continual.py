"""Continual editing: 30 sequential fact edits with the default strategy keep untouched facts (issue 14).

benchmarks/bench_continual.py measures the same on the demo model up to 1,000 edits; this guards the default on
the small BPE fixture (tests/bpe_world.py: 300 facts, 4,096 slots), where 30 edits are 10 % of its facts.
"""

from __future__ import annotations

import random

import torch

from memedit.editing import background as B
from memedit.editing.patch import write_rows
from memedit.editing.sparse_ft import EditConfig, EditRequest, answers_of, contrast_rows, edit, keep_for
from memedit.tracing.targets import score

from .bpe_world import bpe_model

N_EDITS = 30


def test_thirty_sequential_edits_keep_untouched_facts(tmp_path):
    torch.manual_seed(0)
    model, _, world = bpe_model(tmp_path)
    bg = B.compute(model, world.training_sentences(), 32, 1000, corpus="the fixture world")
    rng = random.Random(0)
    objects = {r.name: r.objects for r in world.relations}
    reqs = []
    for f in rng.sample(world.facts, N_EDITS):  # random new objects, as bench_continual.py draws them
        req = EditRequest.from_fact(f)
        req.target_new = rng.choice([o for o in objects[f.relation] if o != f.target_true])
        reqs.append(req)
    edited = {r.id for r in reqs}
    untouched = [(p, f.target_true) for f in world.facts if f.id not in edited for p in f.training_prompts]

    def accuracy() -> float:
        return sum(s.greedy for s in score(model, *zip(*untouched, strict=True))) / len(untouched)

    before = accuracy()
    answers: dict[str, str] = {}
    subjects = [f.subject for f in world.facts]
    for req in reqs:  # what `memedit edit` does when the facts are known: keep the subject's other facts, at the
        req.keep = keep_for(req, world.facts, answers=answers)  # answers earlier edits gave them; and leave alone
        contrast = contrast_rows(model, [req], EditConfig().contrast, subjects)
        res = edit(model, [req], bg, EditConfig(), subjects=subjects)  # the rows other subjects' prompts read
        for name, ids in res.slots.items():
            assert not set(ids) & set(contrast.get(name, torch.empty(0)).tolist())
        write_rows(model, res.patch, new=True)
        answers.update(answers_of([req]))
    after = accuracy()
    rw = [r.rewrite_prompt for r in reqs]
    new = score(model, rw, [r.target_new for r in reqs])
    old = score(model, rw, [r.target_true for r in reqs])
    hold = sum(a.mean_logprob > b.mean_logprob for a, b in zip(new, old, strict=True)) / N_EDITS  # as CounterFact
    drop = 100 * (before - after)
    print(f"untouched {before:.1%} -> {after:.1%} ({drop:.1f} pts), edits holding {hold:.0%}")
    assert before >= 0.95
    # measured 93 % (90 % without --contrast; 73 % while kept sibling facts were kept at their original answers,
    # undoing earlier edits of the same subject): later edits retrain rows of earlier ones on this small table
    assert hold >= 0.8, hold
    # Measured 4.4 points with the defaults (rows at every position, the subject's other facts kept; the same with
    # and without --contrast here; on the demo it cut the drop after 500 edits from 7.3 to 5.0); the previous
    # defaults (answer positions, nothing kept) lost 21.6 on this 4,096-slot fixture, where an edit's up to 1,024
    # rows are a quarter of the table. On the 65,536-slot demo, benchmarks/bench_continual.py: see the README.
    assert drop <= 6.0, drop
