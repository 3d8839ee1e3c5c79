"""Token batches: right padding (safe, attention is causal) with the one pad-id fallback, and batches of texts.

(A corpus too large to hold is streamed in batches by memedit.auditing.audit.corpus_batches instead.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MemeditError


def pad_id(model) -> int:
    """The id that pads a batch: the tokenizer's pad id, else 0 (padded positions are masked out or never read)."""
    tokenizer = getattr(model, "tokenizer", None)
    pad = tokenizer.pad_id if tokenizer is not None else None
    return int(pad) if pad is not None else 0


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to (B, T); returns (tokens, lengths). Causal attention makes right padding safe."""
    if not seqs:
        raise MemeditError("nothing to score: no prompts")
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in seqs])


def text_batches(model, texts: Sequence[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens (B, T), valid (B, T) bool) batches of BOS + text (+ EOS), right-padded."""
    tok = model.tokenizer
    if tok is None:
        raise MemeditError("this model has no tokenizer: text commands need one")
    seqs = []
    for t in texts:
        if t.strip():
            ids = model.encode(t)
            seqs.append(ids + ([tok.eos_id] if tok.eos_id is not None else []))
    if not seqs:
        raise MemeditError("the text tokenizes to nothing: give a file with text lines")
    pad = pad_id(model)
    out = []
    for start in range(0, len(seqs), batch_size):
        tokens, lengths = pad_batch(seqs[start : start + batch_size], pad)
        out.append((tokens, torch.arange(tokens.shape[1])[None, :] < lengths[:, None]))
    return out


LOOKUP_BYTES = 128 << 20  # stage-1 sub-key scores of one forward: (positions, H, 2, N) float32


def lookup_tokens(model) -> int:
    """Positions (padding included) per forward that keep the lookup's sub-key scores within LOOKUP_BYTES: 1,024
    at N 4096 and 4 heads (a batch of 64 lines of 72 tokens would need 604 MB there), more than a batch at N 1024."""
    mem = model.config.memory
    return max(1, LOOKUP_BYTES // max(1, mem.heads * 2 * mem.n_keys * 4))


def within(seqs: Sequence[Sequence[int]], positions: int) -> list[tuple[int, int]]:
    """[(start, stop)]: consecutive runs of ``seqs`` whose padded batch (count x longest) holds at most
    ``positions`` positions (a run of one sequence whatever its length)."""
    out, start, longest = [], 0, 0
    for i, s in enumerate(seqs):
        longest_with = max(longest, len(s))
        if i > start and (i - start + 1) * longest_with > positions:
            out.append((start, i))
            start, longest_with = i, len(s)
        longest = longest_with
    if start < len(seqs):
        out.append((start, len(seqs)))
    return out
