"""Fact edits by sparse memory finetuning (Lin et al., 2025; docs/reference.md §6).

1. Count the slots the new fact reads: c(i) over the lookups of its training phrasings, each followed by the new
   target's tokens (teacher forcing) — ``positions``: the answer positions only (every position that predicts a
   target token; the default), or every position; padding is never counted.
2. Rank slots against the background: TF-IDF ``c(i)/Σc · log((|B|+1)/(df(i)+1))`` (default), KL contribution
   ``p_new log(p_new / p_bg)`` with add-one smoothing, or raw counts (a baseline).
3. Train only the value rows of the top-t slots on the new answer (cross-entropy over every token of the new
   target, teacher forcing, in every training phrasing; memedit/tracing/targets.py): the gradient of every other row, of
   every frozen row and of every other parameter is masked. Plain SGD with a large learning rate (the reference's
   choice); AdamW as an option. As few rows as the edit needs (``adaptive``), rows of earlier edits optionally
   protected (``protect``): see :class:`EditConfig`.
4. The change is returned as a :class:`~memedit.editing.patch.Patch`, so it can be saved, applied and reverted exactly.

Metrics (:func:`measure`) follow the knowledge-editing conventions of §7 on whole targets, taken right after each
edit: efficacy = [mean per-token log P(new) > mean per-token log P(true)] on the rewrite prompt, likewise on
paraphrases and (reversed) on neighbourhood prompts, as CounterFact compares sequences; exact match = greedy
decoding of the rewrite prompt reproduces the new target.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from .. import limits
from ..errors import MemeditError
from ..lm.batching import pad_batch, pad_id
from ..lm.model import MemoryModel
from ..storage.checkpoint import fingerprint
from ..storage.state import edit_log, frozen_rows
from ..tracing.capture import SlotCounter, fixed_prefix, on_lookup, trainable_rows
from ..tracing.targets import TargetTokens, answer_or_given, score, tokenize_target
from .background import Background
from .config import FORGETTING_SAMPLE, EditConfig
from .consolidate import Consolidation, Mentions, consolidate
from .locality import Answers, Collateral, Locality
from .optim import SGD as _SGD
from .patch import Patch, make_patch, write_rows

RANKINGS = ("tfidf", "kl", "counts")
PROTECT = ("none", "edits", "hot")


LR_REF, NORM_REF = 10.0, 11.0  # the demo's lr, and its value rows' median norm


def default_lr(model: MemoryModel, sample: int = 4096) -> float:
    """SGD's learning rate for ``model``: LR_REF x (median norm of up to ``sample`` value rows / NORM_REF)^2."""
    norms = []
    for t in model.tables:
        ids = torch.randperm(t.n_rows, generator=torch.Generator().manual_seed(0))[:sample].sort().values
        norms.append(t.weight.detach()[ids].float().norm(dim=-1))
    return LR_REF * (float(torch.cat(norms).median()) / NORM_REF) ** 2


@dataclass
class EditRequest:
    """A fact rewrite in the shape of §7: ``prompt`` with "{}" for the subject."""

    prompt: str
    subject: str
    target_new: str
    target_true: str = ""  # if empty: the model's own answer (greedy, to the end of the word)
    paraphrases: list[str] = field(default_factory=list)  # trained on, like the prompt
    heldout_paraphrases: list[str] = field(default_factory=list)  # measured only
    neighborhood: list[str] = field(default_factory=list)  # other subjects: must keep their answer
    id: str = ""
    # (prompt, answer) pairs the edit must not change, trained on alongside it (teacher forcing on their answers):
    # e.g. the subject's other facts, whose answers read the same subject-position rows (see keep_for)
    keep: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Refuse what a request cannot mean, naming the field: text that is not text (or not UTF-8), a list of
        phrasings given as one string, an empty target, a "{}" with no subject."""
        for name in ("prompt", "subject", "target_new", "target_true"):
            limits.text(getattr(self, name), f"field {name!r}")
        for name in ("paraphrases", "heldout_paraphrases", "neighborhood"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise MemeditError(f"field {name!r} must be a list of strings, not {_json_kind(value)} "
                                   f"(e.g. [\"The birthplace of {{}} is\"])")
            for i, x in enumerate(value):
                limits.text(x, f"field {name!r}[{i}]")
            setattr(self, name, list(value))
        if not self.target_new.strip():
            raise MemeditError("an edit request needs a non-empty target_new")
        limits.subject_prompt(self.prompt, self.subject, require_placeholder=False)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject)  # not str.format: user prompts may hold other braces

    @property
    def training_prompts(self) -> list[str]:
        return [self.rewrite_prompt] + list(self.paraphrases)

    @classmethod
    def from_dict(cls, d: dict) -> EditRequest:
        if not isinstance(d, dict):
            raise MemeditError(f"an edit request must be a JSON object {{\"prompt\": ..., \"subject\": ..., "
                               f"\"target_new\": ...}}, not {_json_kind(d)}")
        try:
            keep = d.get("keep", [])
            if not isinstance(keep, list):
                raise MemeditError(f"field 'keep' must be a list, not {_json_kind(keep)}")
            req = cls(prompt=d["prompt"], subject=d.get("subject", ""), target_new=d["target_new"],
                      target_true=d.get("target_true", ""), paraphrases=d.get("paraphrases", []),
                      heldout_paraphrases=d.get("heldout_paraphrases", []),
                      neighborhood=d.get("neighborhood", []), id=str(d.get("id", "")),
                      keep=[_pair(k) for k in keep])
        except KeyError as e:
            raise MemeditError(f"an edit request needs {e.args[0]!r} "
                               "(keys: prompt, subject, target_new, ...)") from None
        return req

    @classmethod
    def from_fact(cls, fact) -> EditRequest:
        return cls.from_dict(fact.to_json())


def _json_kind(x) -> str:
    """What a JSON value is, in words: 'a number (5)', 'null', 'a string ("The birthplace")'."""
    if x is None:
        return "null"
    kind = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(x), type(x).__name__)
    return f"{kind} ({x!r:.40})" if isinstance(x, (int, float, str)) else kind


def _pair(k) -> tuple[str, str]:
    """A keep entry: {"prompt": ..., "target": ...} or [prompt, target]."""
    if isinstance(k, dict) and isinstance(k.get("prompt"), str) and isinstance(k.get("target"), str):
        return k["prompt"], k["target"]
    if isinstance(k, (list, tuple)) and len(k) == 2 and all(isinstance(x, str) for x in k):
        return k[0], k[1]
    raise MemeditError(f"a keep entry must be {{\"prompt\": ..., \"target\": ...}} or [prompt, target], not {k!r}")


def consistent_keep(request: EditRequest) -> list[tuple[str, str]]:
    """The request's keep pairs minus those that contradict it: a prompt the edit trains on, or the old answer itself
    (a fact of the same subject and relation asked in another wording: keeping it would undo the edit)."""
    mine = set(request.training_prompts)
    old = request.target_true.strip()
    return [(p, t) for p, t in request.keep if p not in mine and t.strip() not in (old, request.target_new.strip())]


def keep_for(request: EditRequest, facts: Sequence, per_fact: int = 3,
             answers: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of the request's subject's other facts (``per_fact`` phrasings each).

    Counting slot reads at every position (``positions="all"``) trains rows read at the subject's tokens, which
    every fact of that subject reads too: keeping those facts' answers in the loss lets the edit move only what
    they do not need. Facts are any objects with ``subject``, ``training_prompts`` and ``target_true``. A fact that
    an earlier edit rewrote is kept at its new answer: ``answers`` maps a fact id or a rewrite prompt to it
    (:func:`edited_answers`, :func:`answers_of`); keeping the old one would undo that edit.

    On the demo, 60 sequential edits cost the edited subjects' other facts (all their training phrasings) 4.75
    points with one phrasing kept per fact and 1.08 with three (other subjects: 0.67 and 0.70); an edit then takes
    ~25 % more steps.
    """
    answers = answers or {}

    def answer(f) -> str:
        for key in (getattr(f, "id", None), *f.training_prompts):
            if key in answers:
                return answers[key]
        return f.target_true

    mine = request.rewrite_prompt
    return [(p, answer(f)) for f in facts if f.subject == request.subject and getattr(f, "id", None) != request.id
            for p in f.training_prompts[:per_fact] if p != mine]


def answers_of(requests: Sequence[EditRequest]) -> dict[str, str]:
    """{fact id (if any) and rewrite prompt: new answer} of edit requests."""
    return {k: r.target_new for r in requests for k in ([r.id] if r.id else []) + [r.rewrite_prompt]}


def applied_edits(model: MemoryModel) -> list[dict]:
    """The edit-log entries of the fact edits the model folder holds as applied (not reverted), oldest first."""
    applied: dict[str, dict] = {}
    for e in edit_log(model):
        if e.get("kind") != "edit" or "id" not in e:
            continue
        if e.get("op") == "apply":
            applied[e["id"]] = e
        elif e.get("op") == "revert":
            applied.pop(e["id"], None)
    return list(applied.values())


def edited_answers(model: MemoryModel) -> dict[str, str]:
    """:func:`answers_of` the fact edits the model folder's log holds as applied (not reverted), later edits last."""
    out: dict[str, str] = {}
    for e in applied_edits(model):
        out.update(e.get("answers") or {})
    return out


@dataclass
class EditResult:
    patch: Patch | None  # None for the train_all baseline, and when every request already held
    slots: dict[str, list[int]]  # the rows trained, per table
    steps: int
    loss: float
    seconds: float
    metrics: dict = field(default_factory=dict)
    done: bool = True  # every request holds by the stop rule
    holding: list[bool] = field(default_factory=list)  # per request
    # "committed" (applied in memory, and by the commit function if one was given), "refused" (the guard: see
    # reason), "forced" (over the guard, committed anyway), "already" (the model already gave every new answer)
    status: str = "committed"
    reason: str = ""
    collateral: Collateral | None = None
    consolidation: Consolidation | None = None  # the consolidation pass that ran right after this edit, if one did


# ---- 1. counting slot reads on the new fact -----------------------------------------------------------
def _teacher_batch(model: MemoryModel, items: Sequence[TargetTokens]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (B, T), lengths (B,), labels (B, T)) for teacher forcing: labels hold the target token predicted at
    each answer position and -100 everywhere else (prompt positions and padding)."""
    tokens, lengths = pad_batch([it.sequence for it in items], pad_id(model))
    labels = torch.full(tokens.shape, -100, dtype=torch.long)
    for b, it in enumerate(items):
        n0 = len(it.prompt_ids) - 1
        labels[b, n0 : n0 + len(it.ids)] = torch.tensor(it.ids)
    return tokens, lengths, labels


def fact_items(model: MemoryModel, requests: Sequence[EditRequest], target: str = "new") -> list[TargetTokens]:
    """Every training phrasing of every request, tokenized with its new (or true) target."""
    return [tokenize_target(model, p, r.target_new if target == "new" else r.target_true)
            for r in requests for p in r.training_prompts]


@torch.no_grad()
def fact_counts(model: MemoryModel, items: Sequence[TargetTokens | str], positions: str = "answer"
                ) -> dict[str, torch.Tensor]:
    """Slot reads c(i) per value table (rows,): at the answer positions of each phrasing, or at all positions.

    ``items`` are tokenized phrasings with their target (the answer positions are every position that predicts a
    target token), or bare prompts (the answer position is the last one).
    """
    if positions not in ("answer", "all"):
        raise MemeditError(f"unknown positions {positions!r}: use answer or all")
    seqs, answer = [], []
    for it in items:
        if isinstance(it, str):
            ids = model.encode(it)
            seqs.append(ids)
            answer.append((len(ids) - 1, len(ids)))
        else:
            seqs.append(it.sequence)
            answer.append((len(it.prompt_ids) - 1, len(it.sequence)))
    tokens, lengths = pad_batch(seqs, pad_id(model))
    B, T = tokens.shape
    pos = torch.arange(T)[None, :]
    if positions == "answer":
        lo, hi = torch.tensor(answer).T
        keep = (pos >= lo[:, None]) & (pos < hi[:, None])  # (B, T)
    else:
        keep = pos < lengths[:, None]
    counter = SlotCounter(model)
    counter.batch(keep.flatten())
    with on_lookup(model, counter):
        model(tokens.to(next(model.parameters()).device))
    return {name: counter.table_reads(name).float() for name in counter.tables}


# ---- 2. ranking ------------------------------------------------------------------------------------------
def rank(counts: dict[str, torch.Tensor], bg: Background | None, ranking: str = "tfidf") -> dict[str, torch.Tensor]:
    """A score per row (rows,) for each table; rows the fact never read score -inf."""
    if ranking not in RANKINGS:
        raise MemeditError(f"unknown ranking {ranking!r} (choose from {', '.join(RANKINGS)})")
    out = {}
    for name, c in counts.items():
        tf = c / c.sum().clamp_min(1)
        if ranking == "counts":
            s = tf.clone()
        elif ranking == "tfidf":
            s = tf * bg.idf(name)
        else:  # KL contribution against the add-one smoothed background distribution
            bgc = bg.counts[name].float()
            p_bg = (bgc + 1) / (bgc.sum() + bgc.numel())
            s = tf * torch.log(tf.clamp_min(1e-30) / p_bg)
        out[name] = s.masked_fill(c == 0, -math.inf)
    return out


def edited_rows(model: MemoryModel) -> dict[str, torch.Tensor]:
    """{table: row ids} trained by the fact edits the model folder's edit log holds as applied (not reverted)."""
    out: dict[str, list[int]] = {}
    for rows in (e.get("rows") or {} for e in applied_edits(model)):
        for name, ids in rows.items():
            out.setdefault(name, []).extend(int(i) for i in ids)
    return {k: torch.tensor(sorted(set(v)), dtype=torch.long) for k, v in out.items()}


def protected_rows(model: MemoryModel, cfg: EditConfig, bg: Background | None,
                   extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{table: row ids} an edit must not train under ``cfg.protect``, plus ``extra`` (e.g. rows of edits made in
    memory)."""
    if cfg.protect not in PROTECT:
        raise MemeditError(f"unknown protect {cfg.protect!r} (choose from {', '.join(PROTECT)})")
    parts: list[dict[str, torch.Tensor]] = [extra or {}]
    if cfg.protect in ("edits", "hot"):
        parts.append(edited_rows(model))
    if cfg.protect == "hot":
        if bg is None:
            raise MemeditError("protect=hot needs background statistics: run `memedit background CORPUS` first")
        for name, df in bg.df.items():
            n = int(cfg.hot_fraction * df.numel())
            if n:
                parts.append({name: df.float().topk(n).indices})
    out: dict[str, torch.Tensor] = {}
    for d in parts:
        for name, ids in d.items():
            out[name] = torch.cat([out[name], ids.long()]) if name in out else ids.long()
    return out


class _Rows:
    """Every value table's rows as one flat index (the table's offset + the row id), for selecting over tables."""

    def __init__(self, model: MemoryModel):
        self.sizes = {t.name: t.n_rows for t in model.tables}
        self.offsets, n = {}, 0
        for name, k in self.sizes.items():
            self.offsets[name], n = n, n + k
        self.n = n

    def mask(self, *parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n,) bool: True at the rows ``parts`` ({table: row ids}) name."""
        out = torch.zeros(self.n, dtype=torch.bool)
        for d in parts:
            for name, ids in d.items():
                if name in self.offsets:
                    out[torch.as_tensor(ids, dtype=torch.long) + self.offsets[name]] = True
        return out

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{table: sorted unique row ids} of flat ids."""
        out = {}
        for name, off in self.offsets.items():
            mine = flat[(flat >= off) & (flat < off + self.sizes[name])] - off
            if mine.numel():
                out[name] = mine.unique()
        return out


class _Candidates:
    """One fact's rankable rows over every table, best first (flat ids, :class:`_Rows`), without the ``blocked``
    rows (frozen, protected) and, unless they are all it reads, without the ``soft`` ones (contrast)."""

    def __init__(self, scores: dict[str, torch.Tensor], space: _Rows, blocked: torch.Tensor,
                 soft: torch.Tensor | None = None):
        ids, vals = [], []
        for name, sc in scores.items():
            r = torch.isfinite(sc).nonzero().flatten()
            ids.append(r + space.offsets[name])
            vals.append(sc[r])
        ids, vals = torch.cat(ids), torch.cat(vals)
        ok = ~blocked[ids]
        ids, vals = ids[ok], vals[ok]
        if soft is not None:
            strict = ~soft[ids]
            if bool(strict.any()):
                ids, vals = ids[strict], vals[strict]
        self.ids = ids[vals.argsort(descending=True, stable=True)]

    def top(self, t: int) -> torch.Tensor:
        return self.ids[:t]


def select(model: MemoryModel, scores: dict[str, torch.Tensor], top_t: int,
           protected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The top-t rows over all tables by score (rows the fact read, not frozen, not protected): {table: row ids}."""
    space = _Rows(model)
    c = _Candidates(scores, space, space.mask(frozen_rows(model), protected or {}))
    if not len(c.ids):
        raise MemeditError("every slot this fact reads is frozen or protected: nothing can be trained")
    return space.split(c.top(top_t))


# ---- 3. training ------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    """The teacher-forcing batch of an edit: every training phrasing of every request followed by its new target,
    then every keep pair followed by its answer; ``owner`` (B,) the request each row belongs to, ``edit`` (B,) True
    for a phrasing row (False: a keep pair)."""

    tokens: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): the target token at each answer position, -100 elsewhere
    owner: torch.Tensor  # (B,) int64
    edit: torch.Tensor  # (B,) bool
    n_requests: int


def _batch(model: MemoryModel, requests: Sequence[EditRequest]) -> _Batch:
    items, owner, is_edit = [], [], []
    for i, r in enumerate(requests):
        mine = fact_items(model, [r])
        items += mine
        owner += [i] * len(mine)
        is_edit += [True] * len(mine)
    for i, r in enumerate(requests):
        keep = [tokenize_target(model, p, t) for p, t in r.keep]
        items += keep
        owner += [i] * len(keep)
        is_edit += [False] * len(keep)
    tokens, _, labels = _teacher_batch(model, items)
    return _Batch(tokens, labels, torch.tensor(owner), torch.tensor(is_edit), len(requests))


KEEP_TOKEN_LOSS = math.log(2)  # a kept answer's token stays the greedy one while its loss is below this (p > 1/2)


def _loss(logits: torch.Tensor, b: _Batch, stop: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(loss, holds (n_requests,) bool, mean loss) for logits (B, T, vocab): prompt and padding positions ignored.

    A request's loss is the mean cross-entropy over the tokens of its phrasings' new targets and of its keep pairs'
    answers (teacher forcing). The batch's loss is the SUM over the requests that do not hold yet, so each request
    moves as fast as it would alone whatever the batch size, and a request stops pulling once it holds (a batch of
    one is exactly a single edit). A request holds when every token of its new target, in every phrasing, has a
    loss below ``stop`` and every token of its keep pairs one below KEEP_TOKEN_LOSS.
    """
    labels = b.labels.to(logits.device)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                         reduction="none").view(labels.shape)  # (B, T)
    on = labels != -100
    owner = b.owner.to(logits.device)
    n = b.n_requests
    row_sum, row_n = (ce * on).sum(1), on.sum(1)  # (B,)
    req_sum = torch.zeros(n, device=ce.device).index_add(0, owner, row_sum)
    req_n = torch.zeros(n, device=ce.device).index_add(0, owner, row_n.float())
    per_request = req_sum / req_n.clamp_min(1)  # (n,)
    row_max = (ce.detach() * on).amax(1)  # (B,) ce >= 0, so masked zeros never win
    edit_rows = b.edit.to(logits.device)
    worst_edit = torch.zeros(n, device=ce.device).scatter_reduce(0, owner[edit_rows], row_max[edit_rows], "amax")
    worst_keep = torch.zeros(n, device=ce.device).scatter_reduce(0, owner[~edit_rows], row_max[~edit_rows], "amax")
    holds = (worst_edit < stop) & (worst_keep < KEEP_TOKEN_LOSS)
    loss = (per_request * (~holds).float()).sum()
    return loss, holds.cpu(), float(ce.detach()[on].mean())


@dataclass
class Preserve:
    """What training keeps: the locality sample's greedy tokens and distributions before the edit, on its training
    half (the guard measures on the held-out half), minus the sequences that mention an edited subject."""

    locality: Locality
    allowed: torch.Tensor  # (B,) bool: training-half sequences that do not mention an edited subject
    cfg: EditConfig
    seed: int = 0
    pinned: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # always in the step
    history: Answers | None = None  # the answers of earlier edits: kept, like pinned ones
    history_rows: torch.Tensor | None = None  # those of them that read the rows being trained

    @torch.no_grad()
    def history_flipped(self, model: MemoryModel, rows: dict[str, torch.Tensor]) -> bool:
        """Whether the model now changes an answer of an earlier edit that reads one of ``rows``."""
        hist = self.history
        if hist is None:
            return False
        ids = hist.sequences_reading(rows)[-HISTORY_CHECKED:]  # the most recent that read them
        return any(bool(hist.flipped(c, hist.logits(c)).any()) for c in hist._chunks(ids))

    def candidates(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """The allowed sequences that read one of ``rows`` (the only ones training them can move)."""
        return self.locality.sequences_reading(rows, self.allowed)

    @torch.no_grad()
    def flipped(self, model: MemoryModel, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Of ``cfg.preserve_check`` allowed sequences (a fixed draw) that read one of ``rows``, those whose firm
        greedy tokens the model now changes."""
        loc = self.locality
        cand = self.candidates(rows)
        if self.cfg.preserve_check and len(cand) > self.cfg.preserve_check:
            g = torch.Generator().manual_seed(self.seed)
            cand = cand[torch.randperm(len(cand), generator=g)[: self.cfg.preserve_check]]
        out = []
        for ids in loc._chunks(cand):
            out.append(ids[loc.flipped(ids, loc.logits(ids), self.cfg.preserve_margin / 4)])
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _preservation(model: MemoryModel, preserve: Preserve, candidates: torch.Tensor, gen: torch.Generator,
                  n_active: int) -> tuple[torch.Tensor | float, bool]:
    """(the preservation loss of one step, whether every pinned sequence keeps its greedy tokens): on the pinned
    sequences and ``cfg.preserve_sample`` others drawn from ``candidates``, weight x (requests still training) x
    (the margin term + ``preserve_kl`` x the KL term) (memedit/editing/locality.py)."""
    cfg, loc = preserve.cfg, preserve.locality
    extra = candidates[torch.randperm(len(candidates), generator=gen)[: cfg.preserve_sample]]
    pick = torch.cat([preserve.pinned, extra[~torch.isin(extra, preserve.pinned)]])
    term, ok = 0.0, True
    if len(pick):
        logits = loc.logits(pick)
        k = len(preserve.pinned)
        ok = not bool(loc.flipped(pick[:k], logits[:k].detach(), cfg.preserve_margin / 4).any()) if k else True
        term = cfg.preserve * loc.margin_term(logits, pick, cfg.preserve_margin)
        if cfg.preserve_kl:
            term = term + cfg.preserve_kl * loc.kl_term(logits, pick)
    hist = preserve.history
    if hist is not None and preserve.history_rows is not None and len(preserve.history_rows):
        h = preserve.history_rows
        logits = hist.logits(h)
        ok = ok and not bool(hist.flipped(h, logits.detach()).any())
        term = term + cfg.preserve * hist.margin_term(logits, h, cfg.preserve_margin)
    return max(n_active, 1) * term, ok


def train_rows(model: MemoryModel, requests: Sequence[EditRequest], rows: dict[str, torch.Tensor] | None,
               cfg: EditConfig, preserve: Preserve | None = None) -> tuple[int, float, torch.Tensor]:
    """Train the given value rows (or, with ``cfg.train_all``, every parameter) in place; returns (steps, mean loss,
    which requests hold: :func:`_loss`).

    The rows are gathered into small leaf tensors that the forward pass reads instead of the table
    (:func:`memedit.tracing.capture.trainable_rows`): the optimizer sees only them, so nothing else can move and no
    gradient or optimizer state is as large as the table. They are written back at the end. With ``preserve``, each
    step adds :func:`_preservation` on locality sequences that read a trained row, and training goes on until the
    pinned sequences keep their greedy tokens too.
    """
    b = _batch(model, requests)
    tokens = b.tokens.to(next(model.parameters()).device)
    if cfg.optimizer not in ("sgd", "adamw"):
        raise MemeditError(f"unknown optimizer {cfg.optimizer!r}: use sgd or adamw")
    steps, loss_val = 0, float("nan")
    holds = torch.zeros(len(requests), dtype=torch.bool)
    on = preserve is not None and rows is not None and (cfg.preserve > 0 or cfg.preserve_kl > 0)
    candidates = preserve.candidates(rows) if on else None
    if on and preserve.history is not None:  # earlier edits whose answers read a trained row (at most 32)
        preserve.history_rows = preserve.history.sequences_reading(rows)[-HISTORY_PINNED:]
    gen = torch.Generator().manual_seed(preserve.seed if preserve is not None else 0)
    with contextlib.ExitStack() as stack:
        if cfg.train_all:  # the baseline: dense, every parameter
            params = list(model.parameters())
            for p in params:
                p.requires_grad_(True)
            stack.callback(lambda: [p.requires_grad_(False) for p in params])
            logits = lambda: model(tokens)  # noqa: E731
        else:
            logits = stack.enter_context(fixed_prefix(model, tokens))  # exact: only value rows are trained
            leaves = stack.enter_context(trainable_rows(model, rows))
            params = list(leaves.values())
        opt = (_SGD(params, cfg.learning_rate, cfg.momentum) if cfg.optimizer == "sgd"
               else torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0))
        for steps in range(1, cfg.steps + 1):
            with torch.enable_grad():
                loss, holds, loss_val = _loss(logits(), b, cfg.stop_token_loss)
                kept = True
                if on:
                    term, kept = _preservation(model, preserve, candidates, gen, int((~holds).sum()))
                    loss = loss + term
                if bool(holds.all()) and kept:
                    steps -= 1
                    break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                _, holds, loss_val = _loss(logits(), b, cfg.stop_token_loss)
        if not cfg.train_all:
            with torch.no_grad():
                for name, leaf in leaves.items():
                    model.table(name).weight[rows[name]] = leaf.detach()
    return steps, loss_val, holds


def contrast_rows(model: MemoryModel, requests: Sequence[EditRequest], n: int,
                  subjects: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """{table: row ids} read at the new target's positions when each request's prompt is about ``n`` other
    subjects (a fixed draw from ``subjects`` per request), or, without subjects, after the request's neighborhood
    prompts (``EditConfig.contrast``). Empty when there is nothing to contrast with."""
    items = []
    pool = sorted(set(subjects or ()))
    for r in requests:
        if not pool:
            prompts = list(r.neighborhood)[:n]
        elif "{}" in r.prompt:
            others = [s for s in pool if s != r.subject]
            rng = random.Random(f"{r.id}|{r.rewrite_prompt}")
            prompts = [r.prompt.replace("{}", s) for s in rng.sample(others, min(n, len(others)))]
        else:  # a prompt without a subject slot has nothing to swap
            prompts = []
        items += [tokenize_target(model, p, r.target_new) for p in prompts]
    if not items:
        return {}
    return {name: (c > 0).nonzero().flatten() for name, c in fact_counts(model, items, "answer").items()}


def edit(model: MemoryModel, requests: Sequence[EditRequest], bg: Background | None, cfg: EditConfig | None = None,
         message: str = "", protect: dict[str, torch.Tensor] | None = None,
         subjects: Sequence[str] | None = None, preserve: Preserve | None = None) -> EditResult:
    """The patch that rewrites the facts of ``requests`` (one batch), with what was trained; the model is unchanged.

    Each request gets its own rows (its top-t by ``cfg.ranking``; adaptive: min_t first, doubled while that request
    does not hold), trained together on the sum of the requests' losses (:func:`_loss`). A batch in which every
    request already holds gives ``status="already"`` and no patch.
    Apply the patch with :func:`memedit.editing.patch.apply` (a model folder) or
    :func:`memedit.editing.patch.write_rows` (memory).
    Baseline ``cfg.train_all`` is the exception: it leaves the model edited and returns no patch.
    ``subjects``: other subjects the model knows (e.g. the known facts'), for ``cfg.contrast``; ``preserve``: the
    locality sample kept during training (:class:`Preserve`).
    """
    cfg = replace(cfg) if cfg is not None else EditConfig()  # a copy: the lr filled in below is this model's
    if cfg.lr is None and cfg.optimizer == "sgd" and not cfg.train_all:
        cfg.lr = default_lr(model)
    if cfg.optimizer == "adamw" and not cfg.train_all:
        warnings.warn("AdamW forgets more than SGD in sparse memory finetuning (reference §6)", stacklevel=2)
    if cfg.ranking != "counts" and bg is None and not cfg.train_all:
        raise MemeditError("TF-IDF and KL ranking need background statistics: run `memedit background` first")
    t0 = time.perf_counter()
    for r in requests:
        r.target_true = answer_or_given(model, r.rewrite_prompt, r.target_true)
        r.keep = consistent_keep(r)
    fact_items(model, requests)  # refuses a target the tokenizer cannot represent, before any training
    if cfg.train_all:  # baseline: every parameter moves, which a value patch cannot hold; the model stays edited
        steps, loss, holds = train_rows(model, requests, None, cfg)
        return EditResult(None, {}, steps, loss, time.perf_counter() - t0, done=bool(holds.all()))

    base_fp = fingerprint(model)  # before training writes rows into the table (and restores them), which would
    # make the table be hashed whole again
    space = _Rows(model)
    blocked = space.mask(frozen_rows(model), protected_rows(model, cfg, bg, protect))
    cands = []
    for r in requests:
        soft = space.mask(contrast_rows(model, [r], cfg.contrast, subjects)) if cfg.contrast else None
        scores = rank(fact_counts(model, fact_items(model, [r]), cfg.positions), bg, cfg.ranking)
        c = _Candidates(scores, space, blocked, soft)
        if not len(c.ids):
            raise MemeditError(f"every slot the fact {r.rewrite_prompt!r} reads is frozen or protected: nothing can "
                               "be trained")
        cands.append(c)
    t = [min(cfg.top_t, cfg.min_t) if cfg.adaptive else cfg.top_t for _ in requests]
    base: dict[str, dict[int, torch.Tensor]] = {}  # table -> {row id: its original contents}, every row trained
    rows: dict[str, torch.Tensor] = {}
    steps, loss = 0, float("nan")
    holds = torch.zeros(len(requests), dtype=torch.bool)
    try:
        while True:
            rows = space.split(torch.cat([c.top(ti) for c, ti in zip(cands, t, strict=True)]))
            for name, ids in rows.items():  # remember the originals of the rows this round adds
                seen = base.setdefault(name, {})
                new = [i for i in ids.tolist() if i not in seen]
                if new:
                    seen.update(zip(new, model.table(name).weight.detach()[new].clone(), strict=True))
            full = all(ti >= cfg.top_t for ti in t)
            budget = cfg.steps - steps if (not cfg.adaptive or full) else min(cfg.round_steps, cfg.steps - steps)
            rc = replace(cfg, steps=max(1, budget))
            n, loss, holds = train_rows(model, requests, rows, rc, preserve if cfg.preserve_always else None)
            steps += n
            if not cfg.adaptive or bool(holds.all()) or full or steps >= cfg.steps:
                break
            # the requests that do not hold yet train more rows, starting from where they stand
            t = [ti if bool(h) else min(cfg.top_t, 2 * ti) for ti, h in zip(t, holds.tolist(), strict=True)]
        for _ in range(cfg.repairs if preserve is not None and bool(holds.all()) else 0):
            # sequences of the sample's training half whose greedy tokens the edit changed are kept from then on,
            # with the answers of earlier edits that read the rows
            flipped = preserve.flipped(model, rows)
            if (not len(flipped) and not preserve.history_flipped(model, rows)) or steps >= cfg.steps:
                break
            preserve.pinned = torch.cat([preserve.pinned, flipped]).unique()
            rc = replace(cfg, steps=min(cfg.repair_steps, cfg.steps - steps))
            n, loss, holds = train_rows(model, requests, rows, rc, preserve)
            steps += n
        updates = {name: (ids, model.table(name).weight.detach()[ids].clone()) for name, ids in rows.items()}
    finally:  # the model is left as it was; the patch carries the change
        with torch.no_grad():
            for name, originals in base.items():
                ids = torch.tensor(list(originals), dtype=torch.long)
                model.table(name).weight[ids] = torch.stack(list(originals.values()))
    seconds = time.perf_counter() - t0
    if steps == 0:  # every request already holds by the stop rule
        return EditResult(None, {}, 0, loss, seconds, done=True, status="already")
    info = {"requests": [asdict(r) for r in requests], "config": asdict(cfg), "steps": steps, "loss": loss}
    msg = message or "edit: " + "; ".join(f"{r.rewrite_prompt} -> {r.target_new}" for r in requests)[:200]
    patch = make_patch(model, updates, message=msg, kind="edit", info=info, base=base_fp)
    return EditResult(patch, {k: v.tolist() for k, v in rows.items()}, steps, loss, seconds,
                      done=bool(holds.all()), holding=holds.tolist())
# ---- metrics ---------------------------------------------------------------------------------------------
def _prefers(model: MemoryModel, prompts: Sequence[str], first: str, second: str) -> list[bool]:
    """[mean per-token log P(first) > mean per-token log P(second)] for each prompt (whole targets, CounterFact)."""
    if not prompts:
        return []
    n = len(prompts)
    sc = score(model, list(prompts) * 2, [first] * n + [second] * n)
    return [a.mean_logprob > b.mean_logprob for a, b in zip(sc[:n], sc[n:], strict=True)]


def _mean(xs: Sequence[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def measure(model: MemoryModel, r: EditRequest) -> dict:
    """Efficacy, paraphrase (training and held-out), neighborhood, their harmonic mean (§7), and exact match."""
    eff = _mean(_prefers(model, [r.rewrite_prompt], r.target_new, r.target_true))
    para = _mean(_prefers(model, r.paraphrases, r.target_new, r.target_true))
    held = _mean(_prefers(model, r.heldout_paraphrases, r.target_new, r.target_true))
    neigh = _mean(_prefers(model, r.neighborhood, r.target_true, r.target_new))
    new = score(model, [r.rewrite_prompt], [r.target_new])[0]
    parts = [x for x in (eff, para, neigh) if x is not None]
    hm = len(parts) / sum(1 / x for x in parts) if parts and all(x > 0 for x in parts) else 0.0
    return {"efficacy": eff, "paraphrase": para, "paraphrase_heldout": held, "neighborhood": neigh, "score": hm,
            "exact_match": float(new.greedy), "logprob_new": new.logprob, "mean_logprob_new": new.mean_logprob}


class Forgetting:
    """Accuracy on other facts' phrasings, tracked across edits: ``update()`` returns the change since last time.

    Uses up to ``sample`` prompts of facts other than the edited ones (a fixed random sample, for speed).
    """

    def __init__(self, model: MemoryModel, facts, sample: int = FORGETTING_SAMPLE, seed: int = 0):
        pairs = [(f.id, p, f.target_true) for f in facts for p in f.training_prompts]
        random.Random(seed).shuffle(pairs)
        self.pairs = pairs[:sample]
        self.model = model
        self.excluded: set[str] = set()
        self.correct = self._correct()
        self._saved: tuple[set[str], torch.Tensor] | None = None

    def _correct(self) -> torch.Tensor:
        """Whether each prompt's greedy continuation is its whole true target (exact match)."""
        sc = score(self.model, [p for _, p, _ in self.pairs], [t for _, _, t in self.pairs])
        return torch.tensor([x.greedy for x in sc], dtype=torch.bool)

    def _keep(self) -> torch.Tensor:
        return torch.tensor([fid not in self.excluded for fid, _, _ in self.pairs])

    def accuracy(self) -> float:
        keep = self._keep()
        return self.correct[keep].float().mean().item()

    def update(self, edited_ids: Sequence[str] = ()) -> dict:
        """After an edit: {accuracy_before, accuracy_after, change} over the sample minus every edited fact."""
        self._saved = (set(self.excluded), self.correct)
        self.excluded.update(edited_ids)
        keep = self._keep()
        before = self.correct[keep].float().mean().item()
        self.correct = self._correct()
        after = self.correct[keep].float().mean().item()
        return {"accuracy_before": before, "accuracy_after": after, "change": after - before, "n": int(keep.sum())}

    def undo(self) -> None:
        """Forget the last update (an edit that was measured, then not committed)."""
        if self._saved is not None:
            self.excluded, self.correct = self._saved
            self._saved = None


HISTORY_KEPT = 2000  # at most this many of the folder's most recent edit answers are kept by a new edit
HISTORY_PINNED = 32  # of them, the most recent that read the trained rows are in every preservation step
HISTORY_CHECKED = 64  # and these are checked for a changed answer before committing (a repair follows)


def earlier_answers(model: MemoryModel) -> list[TargetTokens]:
    """The rewrite prompts of the fact edits the folder holds as applied, with their new answers (the most recent
    HISTORY_KEPT): what later edits keep (:class:`Preserve`)."""
    out = []
    for prompt, answer in list(edited_answers(model).items())[-HISTORY_KEPT:]:
        if " " in prompt.strip():  # a rewrite prompt (the other keys are fact ids)
            try:
                out.append(tokenize_target(model, prompt, answer))
            except MemeditError:  # an answer this tokenizer cannot spell is not kept
                pass
    return out


def run_edits(model: MemoryModel, requests: Sequence[EditRequest], bg: Background | None, cfg: EditConfig,
              sequential: bool = True, commit: Callable[[Patch], None] | None = None,
              forgetting: Forgetting | None = None, progress: Callable[[int, int], None] | None = None,
              keep_facts: Sequence | None = None, subjects: Sequence[str] | None = None,
              locality: Locality | None = None, force: bool = False,
              on_result: Callable[[Sequence[EditRequest], EditResult], None] | None = None,
              consolidation: Locality | None = None) -> list[EditResult]:
    """Make the edits (one by one if ``sequential``, else one batch), each measured right after it and, if the
    guard lets it through, applied (in memory, then by ``commit`` if given) before the next.

    The guard: with a ``locality`` sample, an edit whose collateral (the share of the sample's positions whose
    greedy next token changed, :class:`memedit.editing.locality.Locality`) exceeds ``cfg.max_collateral``, or that
    does not hold by the stop rule, is refused: ``status="refused"``, the model is left as it was, and later groups
    still run (``force``: committed anyway, ``status="forced"``). A group whose every request already holds is
    skipped (``status="already"``). Training keeps the sample's pre-edit distributions (``cfg.preserve``).

    With ``keep_facts``, a request without keep pairs of its own keeps its subject's other facts
    (:func:`keep_for`) at the answers earlier edits (the folder's log, then this run's) and the batch itself give
    them. ``subjects``: other subjects for ``cfg.contrast`` (default: those of ``keep_facts``). ``on_result(group,
    result)`` is called after each group.

    ``consolidation``: a larger sample of text (its reference: the model before this run), on which a sequential
    run gives back what its edits moved after every ``cfg.consolidate_every`` committed edits and after its last
    edit (:mod:`memedit.editing.consolidate`; committed like an edit, reported on the edit it follows)."""
    cfg.check()
    fact_items(model, requests)  # every target tokenizes, before anything is trained
    groups = [[r] for r in requests] if sequential else [list(requests)]
    results = []
    made: dict[str, torch.Tensor] = {}  # rows trained by the edits of this run (a folder's log holds earlier ones)
    answers = edited_answers(model) if keep_facts is not None else {}
    kept = Answers(model, earlier_answers(model), HISTORY_KEPT) if locality is not None else None  # kept by later
    # edits, with this run's
    consolidating = consolidation is not None and kept is not None and sequential and cfg.consolidate_every > 0
    named = Mentions(consolidation.texts) if consolidating else None
    since = 0  # committed edits since the last consolidation pass
    ccfg = replace(cfg, lr=cfg.lr if cfg.lr is not None else default_lr(model)) if consolidating else cfg
    for n, group in enumerate(groups, 1):
        if keep_facts is not None:
            mine = {**answers, **answers_of(group)}  # siblings inside the batch are kept at their new answers
            for r in group:
                if not r.keep:  # a request's own keep pairs (JSONL "keep") win
                    r.keep = keep_for(r, keep_facts, answers=mine)
        edited_subjects = [r.subject for r in group if r.subject]
        preserve = None
        if locality is not None and (cfg.preserve > 0 or cfg.preserve_kl > 0 or cfg.repairs > 0):
            preserve = Preserve(locality, locality.allowed(edited_subjects) & ~locality.held_out, cfg, n,
                                history=kept if kept is not None and len(kept) else None)
        res = edit(model, group, bg, cfg, protect=made if cfg.protect != "none" else None,
                   subjects=subjects if subjects is not None else [f.subject for f in keep_facts or ()],
                   preserve=preserve)
        if res.patch is not None:
            write_rows(model, res.patch, new=True)  # measured in memory first
            if locality is not None:
                res.collateral = locality.collateral({k: torch.tensor(v) for k, v in res.slots.items()},
                                                     edited_subjects)
            reasons = []
            if not res.done:
                held = sum(res.holding)
                reasons.append(f"does not hold by the stop rule ({held} of {len(group)} requests hold after "
                               f"{res.steps} steps)")
            budget = cfg.max_collateral * len(group)  # a batch of n facts may change what n single edits may
            if res.collateral is not None and res.collateral.changed > budget:
                reasons.append(f"collateral {res.collateral.changed:.2%} of the locality sample's greedy tokens "
                               f"changed (budget {budget:.2%}" + (f" = {len(group)} x {cfg.max_collateral:.2%})"
                                                                  if len(group) > 1 else ")"))
            res.reason = "; ".join(reasons)
            if reasons:
                res.status = "forced" if force else "refused"
        res.metrics = {"per_request": [measure(model, r) for r in group]}
        if forgetting is not None and res.patch is not None:
            res.metrics["forgetting"] = forgetting.update([r.id for r in group if r.id])
        if res.patch is not None:
            if res.status == "refused":
                write_rows(model, res.patch, new=False)  # the model is left as it was
                if forgetting is not None:
                    forgetting.undo()
            else:
                if commit is not None:
                    write_rows(model, res.patch, new=False)
                    commit(res.patch)  # e.g. memedit.editing.patch.apply: writes the rows in memory and the folder
                for name, ids in res.slots.items():
                    made[name] = torch.cat([made.get(name, torch.empty(0, dtype=torch.long)), torch.tensor(ids)])
                answers.update(answers_of(group))
                if locality is not None:
                    locality.accept({k: torch.tensor(v) for k, v in res.slots.items()}, edited_subjects)
                    kept.add([tokenize_target(model, r.rewrite_prompt, r.target_new) for r in group])
                if consolidating:
                    named.add([(r.subject, (r.target_true, r.target_new)) for r in group if r.subject])
                    since += 1
        if consolidating and since and (since >= cfg.consolidate_every or n == len(groups)):  # the run's last
            # edit is followed by a pass too, over the edits since the previous one
            since = 0
            res.consolidation = _consolidate(model, consolidation, made, named.named, kept, ccfg, n, commit, locality)
        results.append(res)
        if on_result is not None:
            on_result(group, res)
        if progress is not None:
            progress(n, len(groups))
    return results


def _consolidate(model: MemoryModel, sample: Locality, made: dict[str, torch.Tensor], named: torch.Tensor,
                 kept: Answers, cfg: EditConfig, seed: int, commit: Callable[[Patch], None] | None,
                 locality: Locality | None) -> Consolidation:
    """One consolidation pass of a sequential run: measured, and committed (in memory, then by ``commit``) when it
    gives back more than it takes; the locality sample's guard half then takes the model as its reference."""
    changed = {k: v.unique() for k, v in made.items()}
    rep = consolidate(model, sample, changed, named, kept, cfg, seed,
                      message=f"consolidate: {len(kept)} edit answers kept")
    if rep.patch is not None:
        write_rows(model, rep.patch, new=True)
        if commit is not None:
            write_rows(model, rep.patch, new=False)
            commit(rep.patch)
        if locality is not None:
            rows = {c.label: torch.as_tensor(c.rows) for c in rep.patch.changes}
            locality.collateral(rows)
            locality.accept()
    return rep
