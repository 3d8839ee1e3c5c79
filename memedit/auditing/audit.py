"""Audit how a model's memory is used over a corpus: stream it in batches and count every lookup.

    memedit audit CORPUS --out audit.h5
    torchrun --nproc-per-node 2 -m memedit_cli audit CORPUS --distributed --out audit.h5

Under torchrun every rank reads the same token stream, runs the forward pass on its share of the batches
(batch b goes to rank b mod world size), and the statistics are summed with ``all_reduce`` (gloo on CPU, nccl on
GPU); rank 0 writes the result. Since weight mass is counted in integer units (stats.py), the sum is identical to
a single-process audit of the same corpus with the same batch size and threads per process (torchrun sets
OMP_NUM_THREADS=1; float32 matmuls may round differently with another thread count, which can move a softmax
weight in its last bit).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from .. import limits
from ..errors import MemeditError
from ..lm.batching import LOOKUP_BYTES, lookup_tokens, pad_batch, pad_id  # noqa: F401 (LOOKUP_BYTES: re-exported)
from ..lm.model import MemoryModel
from ..storage.checkpoint import fingerprint
from ..storage.corpus import Corpus
from ..tracing.capture import on_lookup
from ..world.facts import world_of
from .stats import AuditCounter, SlotStats, TopContexts

Progress = Callable[[int, float], None]  # (tokens audited so far, fraction of the corpus read)


def open_corpus(source: str | Path | None, model: MemoryModel | None) -> Corpus:
    """The corpus at ``source``, or the demo world's training sentences when ``source`` is None."""
    if source is not None:
        return Corpus.open(source)
    try:
        world = world_of(model)
    except MemeditError:
        raise MemeditError("no CORPUS given, and this model has no demo world to default to: pass a CORPUS "
                           "file (text, one document per line, or JSONL with a \"text\" field)") from None
    return Corpus(description=f"demo world (seed {world.seed}) training sentences", texts=world.training_sentences())


def corpus_batches(model: MemoryModel, corpus: Corpus, batch_size: int = 64, max_tokens: int | None = None,
                  origins: bool = False, batch_tokens: int | None = None) -> Iterator[tuple]:
    """Batches of token sequences (BOS + tokens, split at max_seqlen), stopping after ``max_tokens`` tokens:
    (sequences, fraction of the corpus read), and with ``origins`` a third item, (document, first position) of
    every sequence, where document counts the corpus's non-empty documents from 0.

    Deterministic: every rank of a distributed audit sees the same batches. ``batch_tokens``: a batch also ends
    once it holds that many tokens.
    """
    T = model.config.max_seqlen
    batch: list[list[int]] = []
    where: list[tuple[int, int]] = []
    taken = 0
    frac = 0.0

    def out(f: float) -> tuple:
        return (batch, f, where) if origins else (batch, f)

    for doc, (text, frac) in enumerate(corpus.documents()):
        try:
            ids = model.encode(text)
        except MemeditError:  # a document the tokenizer makes nothing of
            continue
        for start in range(0, len(ids), T):
            seq = ids[start : start + T]
            if max_tokens is not None:
                seq = seq[: max_tokens - taken]
            if not seq:
                continue
            batch.append(seq)
            where.append((doc, start))
            taken += len(seq)
            if len(batch) == batch_size or (batch_tokens is not None and sum(map(len, batch)) >= batch_tokens):
                yield out(frac)
                batch, where = [], []
            if max_tokens is not None and taken >= max_tokens:
                if batch:
                    yield out(1.0)
                return
    if batch:
        yield out(frac)


@torch.no_grad()
def audit(model: MemoryModel, corpus: Corpus, max_tokens: int | None = None, batch_size: int = 64,
          progress: Progress | None = None, rank: int = 0, world_size: int = 1, contexts: int = 0) -> SlotStats:
    """Slot statistics of ``model`` over ``corpus`` (this rank's share of the batches when ``world_size`` > 1);
    with ``contexts`` M > 0 also the top-M contexts of every slot (stats.TopContexts)."""
    if model.tokenizer is None:
        raise MemeditError("this model has no tokenizer, so it cannot read a text corpus")
    if max_tokens is not None and max_tokens < 1:
        raise MemeditError(f"--tokens must be at least 1, got {max_tokens}")
    limits.count(batch_size, "--batch-size", 1, limits.MAX_BATCH_SIZE)
    counter = AuditCounter(model, contexts)
    pad = pad_id(model)
    device = next(model.parameters()).device
    seen = 0  # tokens in the stream so far, all ranks
    tokens_here = 0  # tokens this rank audited
    with on_lookup(model, counter):
        for b, (seqs, frac, where) in enumerate(corpus_batches(model, corpus, batch_size, max_tokens, origins=True,
                                                               batch_tokens=lookup_tokens(model))):
            n = sum(len(s) for s in seqs)
            seen += n
            if b % world_size == rank:
                tokens, lengths = pad_batch(seqs, pad)
                docs, starts = torch.tensor(where, dtype=torch.int64).view(-1, 2).unbind(1)
                counter.documents(tokens, lengths, docs, starts)
                model.run_lookups(tokens.to(device))  # the counter sees the lookups; nothing after them is needed
                tokens_here += n
            if progress is not None:
                progress(seen, max(frac, seen / max_tokens) if max_tokens else frac)
    if seen == 0:
        raise MemeditError(f"the corpus {corpus.description} has no text to audit")
    return SlotStats.counted(counter, tokens_here, corpus.description, fingerprint(model), model.config.to_dict())


# ---- distributed -----------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun set up (gloo for a model on CPU, nccl on CUDA): (rank, world size)."""
    if not launched_by_torchrun():
        raise MemeditError(
            "--distributed needs torchrun: torchrun --nproc-per-node P -m memedit_cli audit CORPUS --distributed ...")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce(stats: SlotStats) -> SlotStats:
    """Sum every rank's statistics in place (integer tensors, so the sum is exact) and return them."""
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    tokens = torch.tensor([stats.tokens], dtype=torch.int64)
    for name in ("counts", "weight_units", "subkey_counts"):
        t = getattr(stats, name).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        setattr(stats, name, t.cpu())
    tokens = tokens.to(device)
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    stats.tokens = int(tokens.item())
    if stats.contexts is not None:  # top-M sets do not add: gather every rank's and merge them, in rank order
        c = stats.contexts
        parts = {}
        for name in ("weight", "key", "where", "tokens"):
            for t, v in getattr(c, name).items():
                wide = v.int() if v.dtype == torch.int16 else v  # gloo has no int16
                got = [torch.empty_like(wide).to(device) for _ in range(dist.get_world_size())]
                dist.all_gather(got, wide.to(device))
                parts[(name, t)] = [g.cpu().to(v.dtype) for g in got]
        merged = None
        for r in range(dist.get_world_size()):
            one = TopContexts(c.layers, c.tables, c.m, *({t: parts[(name, t)][r] for t in c.tables}
                                                         for name in ("weight", "key", "where", "tokens")))
            merged = one if merged is None else merged.merged(one)
        stats.contexts = merged
    return stats


def audit_distributed(model: MemoryModel, corpus: Corpus, max_tokens: int | None = None, batch_size: int = 64,
                      progress: Progress | None = None, contexts: int = 0) -> tuple[SlotStats, int]:
    """Audit this rank's shard and sum over all ranks: (the whole corpus's statistics, this rank)."""
    joined = not dist.is_initialized()  # this call set up the process group, so it also takes it down
    rank, world = init_distributed(next(model.parameters()).device)
    try:
        stats = audit(model, corpus, max_tokens, batch_size, progress if rank == 0 else None, rank, world, contexts)
        stats = all_reduce(stats)
        dist.barrier()
    finally:
        if joined and dist.is_initialized():
            # Left to interpreter shutdown, gloo's worker threads can be torn down unjoined and abort the process
            # ("terminate called without an active exception", SIGABRT) on a loaded machine.
            dist.destroy_process_group()
    return stats, rank

