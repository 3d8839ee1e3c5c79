"""Batched prompt scoring: next-token predictions at the end of each prompt, and fact accuracy (whole targets)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..lm.batching import pad_batch, pad_id
from ..lm.hooks import hooks, memory_path
from ..lm.model import MemoryModel
from ..tracing.targets import accuracy as exact_match_rate


@torch.no_grad()
def last_logits(model: MemoryModel, prompts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """Logits (n_prompts, vocab) for the token after each prompt, in float32."""
    pad = pad_id(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        seqs = [model.encode(p) for p in prompts[start : start + batch_size]]
        tokens, lengths = pad_batch(seqs, pad)
        logits = model(tokens.to(model.tok_embeddings.weight.device))  # (B, T, vocab)
        out.append(logits[torch.arange(len(seqs)), lengths - 1].float().cpu())
    return torch.cat(out)


def accuracy(model: MemoryModel, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 256) -> float:
    """Fraction of prompts whose greedy continuation is the whole target (memedit/tracing/targets.py)."""
    return exact_match_rate(model, prompts, targets, batch_size)


@contextlib.contextmanager
def memory_zeroed(model: MemoryModel) -> Iterator[None]:
    """Within the block, every memory layer outputs zeros (for 'do the facts live in memory?' checks)."""
    with hooks(model, [(memory_path(L), lambda out, name: torch.zeros_like(out)) for L in model.memory_layers]):
        yield


def fact_accuracies(model: MemoryModel, facts, zero_memory: bool = False) -> dict[str, float]:
    """Whole-target accuracy over the facts' training wordings (``train``), held-out wordings (``heldout``) and
    never-seen wordings (``unseen``), where the facts have them."""
    sets = {"train": lambda f: f.training_prompts, "heldout": lambda f: f.heldout_paraphrases,
            "unseen": lambda f: getattr(f, "unseen_paraphrases", [])}
    ctx = memory_zeroed(model) if zero_memory else contextlib.nullcontext()
    res = {}
    with ctx:
        for name, get in sets.items():
            pairs = [(p, f.target_true) for f in facts for p in get(f)]
            if pairs:
                res[name] = accuracy(model, [p for p, _ in pairs], [t for _, t in pairs])
    return res
