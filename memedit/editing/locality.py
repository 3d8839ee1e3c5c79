"""An edit's reach on text: the locality sample, the collateral of a change of value rows, and its preservation.

A value row changes the model only at the positions whose top-k selects it, and through attention (and later
memory layers) at the later positions of the same sequence. A sequence none of whose lookups selects a changed row
is therefore unchanged, exactly; every other sequence is compared before and after. That needs no facts world: the
sample is plain text (a capped sample of the background corpus stored with the background statistics, or
``--locality FILE``), so the collateral of an edit is measured on any model a user brings.

Figures (:meth:`Locality.collateral`), over the sample minus the sequences that mention an edited subject (the
intended change is not collateral):

- ``reads``: the share of positions whose lookup (before the edit, any memory layer) selects a changed row;
- ``kl_mean`` / ``kl_max``: KL(before || after) of the next-token distribution over all positions (nats);
- ``changed``: the share of all positions whose greedy next token changed (the figure the guard bounds).

Training keeps the pre-edit distributions (:meth:`Locality.kl_term`): a KL term on a per-step subsample of the
sequences that read a trained row, so that an edit cannot buy efficacy with collateral.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MemeditError
from ..lm.batching import pad_batch, pad_id
from ..lm.memory import Lookup
from ..lm.model import MemoryModel
from ..storage.corpus import read_texts
from ..tracing.capture import on_lookup, prefix_of, run_from
from ..world.facts import world_of

SAMPLE_TOKENS = 5000  # the stored locality sample's size, in tokens (sequences are whole sentences)
MAX_SEQ_TOKENS = 64  # a longer sentence is cut to its first tokens (a sample of text, not of lengths)
FULL_VOCAB_ELEMENTS = 2**24  # keep the whole pre-edit distribution up to this many (positions x vocabulary) floats
TOP_TOKENS = 64  # beyond that: the top tokens' probabilities and one bucket for the rest (a lower bound on the KL)
META_KEY = "locality"  # the background file's metadata field holding the sample (a JSON list of texts)
CONSOLIDATION_KEY = "consolidation"  # and the one holding the larger sample of consolidation passes


def draw_sample(model: MemoryModel, texts: Sequence[str], max_tokens: int = SAMPLE_TOKENS, seed: int = 0
                ) -> list[str]:
    """Whole texts drawn at random (fixed ``seed``) from ``texts`` until they hold ``max_tokens`` tokens."""
    pool = sorted({t.strip() for t in texts if t and t.strip()})  # each text once
    random.Random(seed).shuffle(pool)
    out, n = [], 0
    for t in pool:
        if n >= max_tokens:
            break
        out.append(t)
        n += min(len(model.encode(t)), MAX_SEQ_TOKENS)
    return out


def encode_sample(texts: Sequence[str]) -> str:
    return json.dumps(list(texts), ensure_ascii=False)


def decode_sample(meta: dict[str, str], key: str = META_KEY) -> list[str] | None:
    """The locality sample (or, with ``key`` = CONSOLIDATION_KEY, the consolidation sample) stored in background
    metadata, or None."""
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        texts = json.loads(raw)
    except ValueError:
        raise MemeditError("the locality sample stored with the background statistics is damaged: recompute it "
                           "with `memedit background`") from None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise MemeditError("the locality sample stored with the background statistics is not a list of texts: "
                           "recompute it with `memedit background`")
    return texts


def mentions(text: str, subjects: Sequence[str]) -> bool:
    """Whether ``text`` names one of ``subjects`` (as a whole word)."""
    return any(s and re.search(rf"(?<!\w){re.escape(s)}(?!\w)", text) for s in subjects)


@dataclass
class Collateral:
    """What a change of value rows did to the locality sample (module docstring)."""

    positions: int  # positions measured (the sample minus sequences that mention an edited subject)
    sequences: int
    reads: float  # share of positions whose lookup selects a changed row
    kl_mean: float  # nats, over all positions
    kl_max: float
    changed: float  # share of all positions whose greedy next token changed
    exact_kl: bool  # False: the KL is over the top tokens and one bucket for the rest (a lower bound)

    def to_json(self) -> dict:
        return {"positions": self.positions, "sequences": self.sequences, "reads": self.reads,
                "kl_mean": self.kl_mean, "kl_max": self.kl_max, "changed": self.changed, "exact_kl": self.exact_kl}


class Locality:
    """The locality sample, tokenized once, with the current model's next-token distributions and lookups.

    :meth:`accept` after a committed change makes the model as it is now the "before" of the next measurement.
    """

    def __init__(self, model: MemoryModel, texts: Sequence[str], batch: int = 64):
        texts = [t for t in texts if t.strip()]
        seqs = [model.encode(t)[:MAX_SEQ_TOKENS] for t in texts]
        keep = [i for i, s in enumerate(seqs) if len(s) >= 2]
        if not keep:
            raise MemeditError("the locality sample holds no text of two tokens or more")
        self.model, self.batch = model, batch
        self.texts = [texts[i] for i in keep]
        self.tokens, self.lengths = pad_batch([seqs[i] for i in keep], pad_id(model))  # (B, T), (B,)
        B, T = self.tokens.shape
        self.valid = torch.arange(T)[None, :] < self.lengths[:, None]  # (B, T)
        # every other sequence trains (preservation), the rest is held out: the guard measures there
        self.held_out = torch.arange(B) % 2 == 1
        V = model.config.vocab_size
        self.exact = int(self.valid.sum()) * V <= FULL_VOCAB_ELEMENTS
        self.k = V if self.exact else min(TOP_TOKENS, V)
        self.refresh()

    @torch.no_grad()
    def _forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(logits (b, t, V), {layer: slot ids (b, t, H*k)}) for sample sequences ``rows``, cut to their longest
        (t = :meth:`width`)."""
        t = self.width(rows)
        slots: dict[int, torch.Tensor] = {}

        def keep(L: int, lk) -> None:  # the slot ids only (capture_lookups would copy every field)
            slots[L] = lk.indices.detach().reshape(len(rows), t, -1).cpu()

        with on_lookup(self.model, keep):
            logits = self.logits(rows)
        return logits.float(), slots

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The model's logits (b, t, V) for sample sequences ``rows`` (differentiable in the value rows), run from
        the stored prefix (:func:`memedit.tracing.capture.run_from`): what no value row changes (the first memory
        layer's input and lookup) is computed once, in :meth:`refresh`."""
        t = self.width(rows)
        dev = self._device
        h = self.prefix_h[rows, :t].to(dev)
        lk = Lookup(**{k: v[rows, :t].flatten(0, 1).to(dev) for k, v in self.prefix_lookup.items()})
        return run_from(self.model, self.prefix_layer, h, lk)

    def _keep_prefix(self, rows: torch.Tensor) -> None:
        """Compute and store the prefix (first memory layer's block input and lookup) of sample sequences ``rows``."""
        B, T = self.tokens.shape
        L, h, lk = prefix_of(self.model, self.batch_tokens(rows))
        b, t = h.shape[:2]
        self.prefix_layer = L
        if self.prefix_h is None:
            self.prefix_h = torch.zeros(B, T, h.shape[-1], dtype=h.dtype)
            self.prefix_lookup = {k: torch.zeros(B, T, *v.shape[1:], dtype=v.dtype)
                                  for k, v in lk.__dict__.items()}
        self.prefix_h[rows, :t] = h.cpu()
        for k, v in lk.__dict__.items():
            self.prefix_lookup[k][rows, :t] = v.reshape(b, t, *v.shape[1:]).cpu()

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def width(self, rows: torch.Tensor) -> int:
        """The longest of sample sequences ``rows``: the width their batch is cut to."""
        return int(self.lengths[rows].max())

    def _chunks(self, ids: torch.Tensor):
        """``ids`` in batches of sequences of similar length (little padding)."""
        ids = ids[self.lengths[ids].argsort(stable=True)]
        for s in range(0, len(ids), self.batch):
            yield ids[s : s + self.batch]

    @torch.no_grad()
    def refresh(self) -> None:
        """Take the model as it is now as the reference: its greedy tokens, distributions and lookups."""
        B, T = self.tokens.shape
        self.greedy = torch.zeros(B, T, dtype=torch.long)
        self.top_ids = None if self.exact else torch.zeros(B, T, self.k, dtype=torch.long)
        self.top_logp = torch.zeros(B, T, self.k)
        self.rest_logp = torch.full((B, T), -float("inf"))
        self.margin = torch.zeros(B, T)  # logit of the greedy token minus the next best
        self.slots: dict[int, torch.Tensor] = {}
        self.prefix_h: torch.Tensor | None = None
        self.prefix_lookup: dict[str, torch.Tensor] = {}
        for rows in self._chunks(torch.arange(B)):
            self._keep_prefix(rows)
            self._store(rows, *self._forward(rows))
        self._pending = []

    def _store(self, rows: torch.Tensor, logits: torch.Tensor, slots: dict[int, torch.Tensor]) -> None:
        """Make ``logits`` (b, t, V) and ``slots`` of sample sequences ``rows`` the reference."""
        B, T = self.tokens.shape
        t = logits.shape[1]
        logp = logits.log_softmax(-1).cpu()
        self.greedy[rows, :t] = logp.argmax(-1)
        two = logits.topk(2, dim=-1).values.cpu()
        self.margin[rows, :t] = two[..., 0] - two[..., 1]
        if self.exact:
            self.top_logp[rows, :t] = logp
        else:
            top = logp.topk(self.k, dim=-1)
            self.top_ids[rows, :t], self.top_logp[rows, :t] = top.indices, top.values
            self.rest_logp[rows, :t] = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7))
        for L, s in slots.items():
            if L not in self.slots:
                self.slots[L] = torch.full((B, T, s.shape[-1]), -1, dtype=torch.long)
            self.slots[L][rows, :t] = s

    def reads(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) bool: positions whose lookup (in the reference model) selects one of ``rows`` {table: ids}."""
        hit = torch.zeros(self.tokens.shape, dtype=torch.bool)
        for t in self.model.tables:
            ids = rows.get(t.name)
            if ids is None or not len(ids):
                continue
            mask = torch.zeros(t.n_rows + 1, dtype=torch.bool)  # the last entry: padding (slot id -1), never hit
            mask[torch.as_tensor(ids, dtype=torch.long)] = True
            for L in t.layers:
                hit |= mask[self.slots[L]].any(-1)
        return hit & self.valid

    def sequences_reading(self, rows: dict[str, torch.Tensor], allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Ids of the sample sequences that read one of ``rows`` (the only ones a change of those rows can move)."""
        hit = self.reads(rows).any(1)
        if allowed is not None:
            hit &= allowed
        return hit.nonzero().flatten()

    def allowed(self, subjects: Sequence[str]) -> torch.Tensor:
        """(B,) bool: sequences that do not mention any of ``subjects``."""
        return torch.tensor([not mentions(t, subjects) for t in self.texts], dtype=torch.bool)

    def _kl(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """KL(reference || model) (b, t) of ``logits`` (b, t, V) against the reference at sample ``rows``."""
        logp = logits.float().log_softmax(-1)
        dev, t = logp.device, logp.shape[1]
        ref = self.top_logp[rows, :t].to(dev)  # (b, t, k)
        after = logp if self.exact else logp.gather(-1, self.top_ids[rows, :t].to(dev))  # (b, t, k)
        kl = (ref.exp() * (ref - after)).sum(-1)
        if not self.exact:
            rest_ref = self.rest_logp[rows, :t].to(dev)
            rest_after = torch.log1p(-after.exp().sum(-1).clamp(max=1 - 1e-7))
            kl = kl + torch.where(rest_ref > -float("inf"), rest_ref.exp() * (rest_ref - rest_after),
                                  torch.zeros_like(kl))
        return kl.clamp_min(0.0)

    @torch.no_grad()
    def collateral(self, changed_rows: dict[str, torch.Tensor], subjects: Sequence[str] = (),
                   held_out: bool = True) -> Collateral:
        """What the model as it is now changed against the reference, on the sample's held-out half (``held_out``;
        else on all of it) minus ``subjects``' sequences.

        Only sequences that read a changed row are run: the others are unchanged, exactly (module docstring).
        """
        allowed = self.allowed(subjects) & (self.held_out if held_out else True)
        valid = self.valid & allowed[:, None]
        n_pos = int(valid.sum())
        reads = self.reads(changed_rows) & valid
        touched = reads.any(1).nonzero().flatten()
        kl_sum, kl_max, n_changed = 0.0, 0.0, 0
        self._pending = []
        for rows in self._chunks(touched):
            logits, slots = self._forward(rows)
            self._pending.append((rows, logits, slots))
            t = logits.shape[1]
            v = valid[rows, :t]
            kl = self._kl(logits, rows) * v.to(logits.device)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max())) if kl.numel() else kl_max
            n_changed += int(((logits.argmax(-1).cpu() != self.greedy[rows, :t]) & v).sum())
        n = max(n_pos, 1)
        return Collateral(n_pos, int(allowed.sum()), float(reads.sum()) / n, kl_sum / n, kl_max, n_changed / n,
                          self.exact)

    @torch.no_grad()
    def accept(self, changed_rows: dict[str, torch.Tensor] | None = None, subjects: Sequence[str] = ()) -> None:
        """After :meth:`collateral`, when its change is committed: the model as measured becomes the reference
        (only the sequences that read a changed row moved), and so does the model on the sequences that mention
        ``subjects`` and read one of ``changed_rows`` (the intended change, which :meth:`collateral` leaves out).
        The other sequences of the training half keep the reference they had: preservation keeps them as the
        model was before the run's edits."""
        for rows, logits, slots in self._pending:
            self._store(rows, logits, slots)
        self._pending = []
        if changed_rows and subjects:
            mine = self.reads(changed_rows).any(1) & ~self.allowed(subjects)
            for rows in self._chunks(mine.nonzero().flatten()):
                self._store(rows, *self._forward(rows))

    @torch.no_grad()
    def flipped(self, rows: torch.Tensor, logits: torch.Tensor, min_margin: float = 0.0) -> torch.Tensor:
        """(b,) bool: which of sample sequences ``rows`` have a position whose greedy token differs from the
        reference in ``logits`` (b, t, V), counting only positions whose reference margin is at least
        ``min_margin`` (near-ties flip back and forth under any change)."""
        t = logits.shape[1]
        firm = self.valid[rows, :t] & (self.margin[rows, :t] >= min_margin)
        return ((logits.argmax(-1).cpu() != self.greedy[rows, :t]) & firm).any(1)

    def margin_term(self, logits: torch.Tensor, rows: torch.Tensor, cap: float) -> torch.Tensor:
        """Mean over the valid positions of sample ``rows`` of relu(min(reference margin, cap) / 2 - margin now),
        where a margin is the logit of the reference's greedy token minus the best other logit: zero while every
        greedy token keeps at least half its reference margin (up to ``cap``), and a pull as soon as one does not."""
        t = logits.shape[1]
        dev = logits.device
        g = self.greedy[rows, :t].to(dev)  # (b, t)
        z = logits.float()
        zg = z.gather(-1, g[..., None]).squeeze(-1)  # (b, t)
        other = z.scatter(-1, g[..., None], -float("inf")).amax(-1)  # (b, t)
        want = self.margin[rows, :t].to(dev).clamp(max=cap) / 2
        v = self.valid[rows, :t].to(dev)
        return (F.relu(want - (zg - other)) * v).sum() / v.sum().clamp_min(1)

    def kl_term(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mean KL(reference || model) over the valid positions of sample ``rows``, for ``logits`` (b, T, V) of those
        rows computed with the trainable rows (a differentiable scalar)."""
        v = self.valid[rows, : logits.shape[1]].to(logits.device)
        return (self._kl(logits, rows) * v).sum() / v.sum().clamp_min(1)

    def batch_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The tokens (b, t) of sample sequences ``rows``, cut to the longest of them."""
        return self.tokens[rows, : self.width(rows)].to(self._device)


def read_locality(path) -> list[str]:
    """The texts of a ``--locality`` file (one per line, or JSONL with a "text" field)."""
    return read_texts(path, "locality sample")


def sample_for(model: MemoryModel, path=None, stored: Sequence[str] | None = None,
               max_tokens: int = SAMPLE_TOKENS) -> list[str] | None:
    """The locality texts an edit measures on: ``path``'s (drawn down to ``max_tokens``), else ``stored`` (the
    sample kept with the background statistics), else (a model with a demo world) a sample of its default corpus;
    None when there is none."""
    if path is not None:
        return draw_sample(model, read_locality(path), max_tokens)
    if stored:
        return list(stored)
    if getattr(model, "meta", {}).get("world"):
        return draw_sample(model, world_of(model).training_sentences(), max_tokens)
    return None


class Answers:
    """The answers earlier edits gave (prompts with their new targets, teacher forcing), kept by later edits.

    The reference is the target itself: an answer position is kept while the model's greedy token there is the
    target's token. Which value rows an answer reads is taken from one forward pass when the answer is added
    (:meth:`add`; later edits may move a later memory layer's lookup a little: it chooses which answers an edit
    keeps, it measures nothing). One forward pass per new answer, not one over every kept answer per edit.
    Same interface as :class:`Locality` for :class:`memedit.editing.sparse_ft.Preserve`.
    """

    def __init__(self, model: MemoryModel, items: Sequence = (), cap: int = 500, batch: int = 64):
        self.model, self.cap, self.batch = model, cap, batch
        self.prompts: list[str] = []
        self.seqs: list[list[int]] = []
        self.starts: list[int] = []
        self.labels: list[list[int]] = []
        self.read: list[dict[str, torch.Tensor]] = []  # {table: sorted unique row ids read at any position}
        self.add(items)

    def __len__(self) -> int:
        return len(self.prompts)

    @torch.no_grad()
    def add(self, items: Sequence) -> None:
        """Keep ``items`` (``TargetTokens``), replacing any kept answer of the same prompt; the oldest answers go
        beyond ``cap``."""
        items = list(items)
        if not items:
            return
        mine = {it.prompt for it in items}
        keep = [i for i, p in enumerate(self.prompts) if p not in mine]
        for name in ("prompts", "seqs", "starts", "labels", "read"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        for s in range(0, len(items), self.batch):
            part = items[s : s + self.batch]
            seqs = [it.sequence for it in part]
            tokens, lengths = pad_batch(seqs, pad_id(self.model))
            slots: dict[int, torch.Tensor] = {}

            def grab(L: int, lk) -> None:
                slots[L] = lk.indices.detach().reshape(len(part), tokens.shape[1], -1).cpu()

            with on_lookup(self.model, grab):
                self.model.run_lookups(tokens.to(self._device))
            for b, it in enumerate(part):
                n = int(lengths[b])
                read = {t.name: torch.cat([slots[L][b, :n].flatten() for L in t.layers]).unique()
                        for t in self.model.tables}
                self.prompts.append(it.prompt)
                self.seqs.append(list(it.sequence))
                self.starts.append(len(it.prompt_ids) - 1)
                self.labels.append(list(it.ids))
                self.read.append(read)
        extra = len(self.prompts) - self.cap
        if extra > 0:
            for name in ("prompts", "seqs", "starts", "labels", "read"):
                setattr(self, name, getattr(self, name)[extra:])

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sequences_reading(self, rows: dict[str, torch.Tensor], allowed=None) -> torch.Tensor:
        """Ids of the kept answers that read one of ``rows`` {table: ids}, oldest first."""
        out = []
        for i, read in enumerate(self.read):
            for name, ids in rows.items():
                got = read.get(name)
                if got is not None and len(ids) and bool(torch.isin(got, torch.as_tensor(ids)).any()):
                    out.append(i)
                    break
        return torch.tensor(out, dtype=torch.long)

    def _chunks(self, ids: torch.Tensor):
        for s in range(0, len(ids), self.batch):
            yield ids[s : s + self.batch]

    def _batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (b, t), labels (b, t) with -1 off the answer positions, valid (b, t)) of answers ``rows``."""
        rows = [int(r) for r in rows]
        tokens, _ = pad_batch([self.seqs[r] for r in rows], pad_id(self.model))
        labels = torch.full(tokens.shape, -1, dtype=torch.long)
        for b, r in enumerate(rows):
            s = self.starts[r]
            labels[b, s : s + len(self.labels[r])] = torch.tensor(self.labels[r])
        return tokens, labels, labels >= 0

    def batch_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        return self._batch(rows)[0].to(self._device)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model(self.batch_tokens(rows))

    @torch.no_grad()
    def flipped(self, rows: torch.Tensor, logits: torch.Tensor, min_margin: float = 0.0) -> torch.Tensor:
        """(b,) bool: which answers ``rows`` the model no longer gives (greedy token != target at some position)."""
        _, labels, valid = self._batch(rows)
        t = logits.shape[1]
        return ((logits.argmax(-1).cpu()[:, :t] != labels[:, :t]) & valid[:, :t]).any(1)

    def margin_term(self, logits: torch.Tensor, rows: torch.Tensor, cap: float) -> torch.Tensor:
        """Mean over the answer positions of relu(cap / 2 - (logit of the target token - best other logit))."""
        _, labels, valid = self._batch(rows)
        dev = logits.device
        g = labels.clamp_min(0).to(dev)
        z = logits.float()
        zg = z.gather(-1, g[..., None]).squeeze(-1)
        other = z.scatter(-1, g[..., None], -float("inf")).amax(-1)
        v = valid.to(dev)
        return (F.relu(cap / 2 - (zg - other)) * v).sum() / v.sum().clamp_min(1)
