"""Consolidation: every so many sequential edits, restore what the edits so far moved on a larger sample of text,
keeping every edit's answer (issue 24's "consolidation from the log").

An edit keeps the greedy tokens of a small locality sample (5,000 tokens: the guard and its repairs, per edit). What
it moves elsewhere in the text accumulates over hundreds of edits: each edit's rows are also read by other facts'
wordings, and each edit may change up to ``max_collateral`` of the sample. A consolidation pass looks at a larger
sample (``EditConfig.consolidate_tokens`` of the background corpus) against the model as it was before the run's
first edit, finds the sequences whose firm greedy tokens the run's edits changed (sequences that state an edited
fact, :class:`Mentions`, are the intended change and are left out), and trains the rows the run changed, and only
those, to give them back while every kept edit answer (:class:`memedit.editing.locality.Answers`) keeps its target,
including the answers that had drifted themselves. The change is one revertible patch (kind ``consolidate``),
committed only when it gives back more sequences than it takes and loses no answer that held.

Cost: one forward pass over the sequences that read a changed row (from the stored prefix), ``consolidate_steps``
training steps on a few dozen sequences and answers, and a check pass, every ``consolidate_every`` edits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..lm.model import MemoryModel
from ..tracing.capture import trainable_rows
from .config import EditConfig
from .locality import Answers, Locality
from .optim import SGD
from .patch import Patch, make_patch


@dataclass
class Consolidation:
    """What one pass found and did."""

    checked: int  # sample sequences that read a row the run changed (and name no edited subject)
    flipped_before: int  # of them, those whose firm greedy tokens differ from the run's start
    flipped_after: int
    answers_lost_before: int  # kept edit answers the model no longer gives
    answers_lost_after: int
    rows: int  # value rows trained
    steps: int
    committed: bool
    patch: Patch | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "patch"}


class Mentions:
    """Which texts of a sample state an edited fact (kept up to date one edit at a time): a text that names the
    edit's subject AND holds its old or new answer. The subject's other facts are not the intended change: a text
    that names the subject without the edited answer is kept (on the BPE fixture, every untouched fact that 50
    sequential edits broke was another fact of an edited subject, left out when any mention of the subject was)."""

    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)
        self.named = torch.zeros(len(self.texts), dtype=torch.bool)
        self.seen: set[tuple[str, tuple[str, ...]]] = set()

    def add(self, edits: Sequence[tuple[str, Sequence[str]]]) -> torch.Tensor:
        """``edits``: (subject, its answers: the old and the new, as text); with no answer given, every text naming
        the subject."""
        for subject, answers in edits:
            answers = tuple(a.strip() for a in answers if a and a.strip())
            if not subject or (subject, answers) in self.seen:
                continue
            self.seen.add((subject, answers))
            pat = re.compile(rf"(?<!\w){re.escape(subject)}(?!\w)")
            for i, t in enumerate(self.texts):
                if subject in t and pat.search(t) and (not answers or any(a in t for a in answers)):
                    self.named[i] = True
        return self.named


def _firm_flips(sample: Locality, ids: torch.Tensor, margin: float) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for c in sample._chunks(ids):
            out.append(c[sample.flipped(c, sample.logits(c), margin)])
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _lost_answers(answers: Answers, ids: torch.Tensor) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for c in answers._chunks(ids):
            out.append(c[answers.flipped(c, answers.logits(c))])
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _rows_read(sample: Locality, ids: torch.Tensor, changed: dict[str, torch.Tensor],
               answers: Answers, answer_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{table: sorted ids}: the rows of ``changed`` that sample sequences ``ids`` or answers ``answer_ids`` read."""
    out = {}
    for t in sample.model.tables:
        ch = changed.get(t.name)
        if ch is None or not len(ch):
            continue
        read = [sample.slots[L][ids].flatten() for L in t.layers if L in sample.slots]
        read += [answers.read[int(i)].get(t.name, torch.empty(0, dtype=torch.long)) for i in answer_ids]
        if not read:
            continue
        r = torch.cat(read)
        r = r[r >= 0].unique()
        mine = r[torch.isin(r, ch)]
        if len(mine):
            out[t.name] = mine
    return out


def consolidate(model: MemoryModel, sample: Locality, changed: dict[str, torch.Tensor], named: torch.Tensor,
                answers: Answers, cfg: EditConfig, seed: int = 0, message: str = "") -> Consolidation:
    """One pass (module docstring) over ``sample`` (its reference: the model before the run's edits), training
    rows of ``changed`` {table: ids}; ``named`` (B,) bool: sample sequences that name an edited subject (left
    out). The model is left unchanged; ``Consolidation.patch`` carries the change when it is to be committed."""
    margin = cfg.preserve_margin / 4
    cand = sample.sequences_reading(changed, ~named)
    flipped = _firm_flips(sample, cand, margin)
    all_answers = torch.arange(len(answers))
    lost = _lost_answers(answers, all_answers) if len(answers) else torch.empty(0, dtype=torch.long)
    report = Consolidation(len(cand), len(flipped), len(flipped), len(lost), len(lost), 0, 0, False)
    if not len(flipped) and not len(lost):
        return report
    rows = _rows_read(sample, flipped, changed, answers, lost)
    if not rows:
        return report
    report.rows = sum(len(v) for v in rows.values())
    kept = answers.sequences_reading(rows)  # answers the training can move: each is kept (the lost ones restored)
    touched = sample.sequences_reading(rows, ~named)  # sample sequences it can move
    gen = torch.Generator().manual_seed(seed)
    lr = cfg.learning_rate
    n = cfg.consolidate_batch
    pinned = lost  # answers in every step: the lost ones, and those the pass itself loses (its repair round)
    with trainable_rows(model, rows) as leaves:
        opt = SGD(list(leaves.values()), lr, cfg.momentum)
        budget, steps = cfg.consolidate_steps, 0
        for repair in (False, True):
            for _ in range(budget):
                steps += 1
                s = flipped[torch.randperm(len(flipped), generator=gen)[:n]] if len(flipped) else flipped
                o = touched[torch.randperm(len(touched), generator=gen)[:n]]
                pick = torch.cat([s, o[~torch.isin(o, s)]])
                a = kept[torch.randperm(len(kept), generator=gen)[:n]] if len(kept) else kept
                a = torch.cat([pinned, a[~torch.isin(a, pinned)]]) if len(pinned) else a
                with torch.enable_grad():
                    loss, done = 0.0, len(flipped) <= n and len(pinned) <= n  # every target is in this batch
                    if len(pick):
                        z = sample.logits(pick)
                        loss = cfg.preserve * sample.margin_term(z, pick, cfg.preserve_margin)
                        done = done and not bool(sample.flipped(pick, z.detach(), margin).any())
                    if len(a):
                        z = answers.logits(a)
                        loss = loss + answers.margin_term(z, a, cfg.preserve_margin)
                        done = done and not bool(answers.flipped(a, z.detach()).any())
                    if done or not torch.is_tensor(loss):  # given back, and nothing in the batch moved
                        steps -= 1
                        break
                opt.zero_grad()
                loss.backward()
                opt.step()
            lost_after = _lost_answers(answers, all_answers) if len(answers) else lost
            new_lost = lost_after[~torch.isin(lost_after, lost)]
            if repair or not len(new_lost):
                break
            # the pass broke answers that held: they join every step of a repair round of half the steps
            pinned = torch.cat([pinned, new_lost]).unique()
            budget = max(1, cfg.consolidate_steps // 2)
        report.steps = steps
        flips_after = _firm_flips(sample, touched, margin)
        # sequences outside ``touched`` read no trained row: they are as they were
        outside = len(flipped) - int(torch.isin(flipped, touched).sum())
        report.flipped_after = len(flips_after) + outside
        report.answers_lost_after = len(lost_after)
        updates = {name: (rows[name], leaf.detach().clone()) for name, leaf in leaves.items()}
    gained = report.flipped_before - report.flipped_after + report.answers_lost_before - report.answers_lost_after
    if gained > 0 and not len(new_lost) and report.steps:
        report.committed = True
        report.patch = make_patch(model, updates, message=message or "consolidate", kind="consolidate",
                                  info=report.to_json())
    return report
