"""Greedy text continuation."""

from __future__ import annotations

import torch

from .. import limits
from .model import MemoryModel


@torch.no_grad()
def generate(model: MemoryModel, prompt: str, max_tokens: int = 8) -> dict:
    """Greedy continuation of ``prompt``; returns {"prompt", "completion", "tokens"} (stops at EOS)."""
    limits.count(max_tokens, "--max-tokens (-n)", 1, limits.MAX_GENERATE_TOKENS)
    ids = model.encode(prompt)
    model.check_context(len(ids) + max_tokens, "the prompt plus the tokens to generate")
    new: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids + new]))[0, -1]
        nxt = int(logits.argmax())
        if nxt == model.tokenizer.eos_id:
            break
        new.append(nxt)
    return {"prompt": prompt, "completion": model.tokenizer.decode(new), "tokens": new}
