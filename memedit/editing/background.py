"""Background slot statistics: how often, and in how many batches of general text, each value row is read.

Sparse memory finetuning (docs/reference.md §6) ranks the slots a new fact uses against this
background: a slot read in nearly every batch (a "hub" that serves grammar or frequent words) gets a low IDF, a
slot read only by the new fact a high one. Stored with the model in ``memedit/background.safetensors``.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import limits
from ..errors import MemeditError
from ..lm.batching import lookup_tokens, pad_batch, pad_id, within
from ..lm.model import MemoryModel
from ..storage.checkpoint import load
from ..storage.state import background, write_background
from ..tracing.capture import SlotCounter, on_lookup
from ..world.facts import world_of
from .config import BACKGROUND_BATCH, BACKGROUND_MAX_BATCHES, EditConfig
from .locality import CONSOLIDATION_KEY, SAMPLE_TOKENS, decode_sample, draw_sample, encode_sample
from .locality import META_KEY as LOCALITY_KEY

DEFAULT_BATCH, DEFAULT_MAX_BATCHES = BACKGROUND_BATCH, BACKGROUND_MAX_BATCHES  # (config.py)
CONSOLIDATION_TOKENS = EditConfig.consolidate_tokens  # the consolidation sample kept (memedit/editing/consolidate.py)
IN_MEMORY_BATCHES = 250  # for a model without stored statistics: a quarter, so a command waits seconds, not a minute


@dataclass
class Background:
    """Per value table: ``df`` (rows,) number of background batches that read each row, ``counts`` (rows,) reads."""

    df: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    n_batches: int
    tokens: int = 0
    corpus: str = ""
    locality: list[str] | None = None  # a capped sample of the corpus's texts (memedit/editing/locality.py)
    consolidation: list[str] | None = None  # a larger one, drawn with the next seed (memedit/editing/consolidate.py)

    def idf(self, table: str) -> torch.Tensor:
        """log((|B| + 1) / (df + 1)) per row: (rows,) float32."""
        return torch.log((self.n_batches + 1) / (self.df[table].float() + 1))


def default_corpus(model: MemoryModel) -> list[str]:
    """The demo world's filler sentences and facts (with their answers): the model's 'general text'."""
    if not getattr(model, "meta", {}).get("world"):
        raise MemeditError("no CORPUS given, and this model has no demo world to default to: pass CORPUS, your own "
                           "text (one passage per line, or JSONL with a \"text\" field)")
    return world_of(model).training_sentences()


@torch.no_grad()
def compute(model: MemoryModel, sentences: Sequence[str], batch_size: int = DEFAULT_BATCH,
            max_batches: int = DEFAULT_MAX_BATCHES, seed: int = 0, corpus: str = "",
            progress: Callable[[int, int], None] | None = None,
            locality_tokens: int = SAMPLE_TOKENS, consolidation_tokens: int = CONSOLIDATION_TOKENS) -> Background:
    """Background statistics over ``sentences`` (shuffled with ``seed``, cut into batches of ``batch_size``), with a
    locality sample of ``locality_tokens`` tokens drawn from them (0: none) and a consolidation sample of
    ``consolidation_tokens`` (drawn with ``seed`` + 1; 0: none)."""
    limits.count(batch_size, "--batch-size", 1, limits.MAX_BATCH_SIZE)
    limits.count(max_batches, "--max-batches", 1, limits.MAX_BATCHES)
    sentences = list(sentences)
    locality = draw_sample(model, sentences, locality_tokens, seed) if locality_tokens > 0 else None
    consolidation = draw_sample(model, sentences, consolidation_tokens, seed + 1) if consolidation_tokens > 0 else None
    random.Random(seed).shuffle(sentences)
    sentences = sentences[: batch_size * max_batches]
    n_batches = (len(sentences) + batch_size - 1) // batch_size
    if not n_batches:
        raise MemeditError("the background corpus is empty")
    counter = SlotCounter(model)
    pad = pad_id(model)
    chunk = batch_size * max(1, 256 // batch_size)  # sentences per forward pass, a whole number of batches
    tokens = 0
    with on_lookup(model, counter):
        for start in range(0, len(sentences), chunk):
            seqs = [model.encode(s) for s in sentences[start : start + chunk]]
            for a, b in within(seqs, lookup_tokens(model)):  # the lookup's scores stay within LOOKUP_BYTES
                toks, lengths = pad_batch(seqs[a:b], pad)
                B, T = toks.shape
                valid = (torch.arange(T)[None, :] < lengths[:, None]).flatten()  # (B*T,) padding masked out
                batch_of = ((torch.arange(B) + a) // batch_size).repeat_interleave(T)[valid]  # background batch
                counter.batch(valid, batch_of)  # a row counts once per background batch in df
                model.run_lookups(toks)  # the counter sees the lookups; nothing after them is needed
                tokens += int(valid.sum())
            counter.close_batch()
            if progress is not None:
                progress(min(start + chunk, len(sentences)) // batch_size, n_batches)
    return Background(counter.df, {name: counter.table_reads(name) for name in counter.tables}, n_batches, tokens,
                      corpus, locality, consolidation)


def save(model: MemoryModel, bg: Background) -> None:
    """Store ``bg`` in the model folder (atomically)."""
    tensors = {f"df.{k}": v for k, v in bg.df.items()} | {f"counts.{k}": v for k, v in bg.counts.items()}
    meta = {"n_batches": bg.n_batches, "tokens": bg.tokens, "corpus": bg.corpus}
    if bg.locality:
        meta[LOCALITY_KEY] = encode_sample(bg.locality)
    if bg.consolidation:
        meta[CONSOLIDATION_KEY] = encode_sample(bg.consolidation)
    write_background(model, tensors, meta)


def carry(model: MemoryModel, copy: str | Path) -> bool:
    """Store ``model``'s background statistics (if it has any) with ``copy``, a folder just written from it (e.g. by
    ``memedit convert``), so edits on the copy rank slots at once; whether there were any."""
    bg = stored(model)
    if bg is not None:
        save(load(copy), bg)
    return bg is not None


def stored(model: MemoryModel) -> Background | None:
    """The background stored with the model, or None."""
    got = background(model)
    if got is None:
        return None
    tensors, meta = got
    df = {k[3:]: v for k, v in tensors.items() if k.startswith("df.")}
    counts = {k[7:]: v for k, v in tensors.items() if k.startswith("counts.")}
    names = {t.name: t.n_rows for t in model.tables}
    if set(df) != set(names) or any(df[n].numel() != r for n, r in names.items()):
        raise MemeditError("the stored background statistics do not match this model's tables; "
                           "recompute them with `memedit background`")
    return Background(df, counts, int(meta.get("n_batches", 0)), int(meta.get("tokens", 0)), meta.get("corpus", ""),
                      decode_sample(meta), decode_sample(meta, CONSOLIDATION_KEY))


_CACHE: weakref.WeakKeyDictionary[MemoryModel, Background] = weakref.WeakKeyDictionary()


def get(model: MemoryModel) -> Background:
    """The stored background, or (for a model without one, e.g. the read-only bundled model) one computed in
    memory on the default corpus (``IN_MEMORY_BATCHES`` batches), cached for this process."""
    bg = stored(model)
    if bg is not None:
        return bg
    if not getattr(model, "meta", {}).get("world"):
        raise MemeditError("this model has no background slot statistics yet (TF-IDF and KL ranking need them): run "
                           "`memedit background CORPUS` on your own text first, or pass --ranking counts")
    if model not in _CACHE:
        _CACHE[model] = compute(model, default_corpus(model), max_batches=IN_MEMORY_BATCHES,
                                corpus=f"default, {IN_MEMORY_BATCHES} batches (computed in memory)")
    return _CACHE[model]


def stored_locality(model: MemoryModel) -> list[str] | None:
    """The locality sample kept with the stored background statistics, or None."""
    got = background(model)
    return decode_sample(got[1]) if got is not None else None
