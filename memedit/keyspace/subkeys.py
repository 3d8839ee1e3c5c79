"""Sub-key state and what `keys adapt` and `keys route` both measure: frozen sub-keys, where a sub-key lives in a
layer's ``keys`` tensor, the LM loss and each position's selected slots over text, and the probe text.

Sub-key rows are rows of a layer's ``keys`` tensor (2*H*N, K/2): row = h*2N + half*N + i. Frozen sub-keys are
listed in the model folder's ``memedit/frozen.safetensors`` under "keys.layer{L}" (row ids of that layer's
``keys``); nothing in keyspace changes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import MemeditError
from ..lm.model import MemoryModel
from ..storage.state import frozen_rows
from ..tracing.capture import capture_lookups
from ..world.facts import world_of
from .config import KEYS


def frozen_key_rows(model: MemoryModel) -> dict[int, torch.Tensor]:
    """{layer: bool mask over its ``keys`` rows (2*H*N,)} of frozen sub-keys."""
    stored = frozen_rows(model)
    out = {}
    for L, layer in model.memory_layers.items():
        mask = torch.zeros(layer.keys.shape[0], dtype=torch.bool)
        ids = stored.get(f"keys.layer{L}")
        if ids is not None:
            if ids.numel() and (ids.min() < 0 or ids.max() >= mask.numel()):
                raise MemeditError(f"frozen.safetensors: keys.layer{L} has row ids outside 0..{mask.numel() - 1}")
            mask[ids] = True
        out[L] = mask
    return out


def subkey_row(layer, head: int, half: int, i: int) -> int:
    """Row of ``keys`` holding sub-key i of ``half`` in ``head``."""
    N = layer.cfg.n_keys
    return head * 2 * N + half * N + i


def lm_loss(model: MemoryModel, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real (non-pad) targets."""
    logits = model(tokens[:, :-1])  # (B, T-1, vocab)
    mask = valid[:, 1:]
    return F.cross_entropy(logits[mask].float(), tokens[:, 1:][mask])


def text_loss(model: MemoryModel, batches) -> float:
    """Token-weighted mean loss over batches (see loss_and_slots)."""
    return loss_and_slots(model, batches)[0]


def selected_slots(model: MemoryModel, batches) -> dict[int, torch.Tensor]:
    """Each real position's selected slots, sorted per head: {layer: (n_positions, H, k)} (see loss_and_slots)."""
    return loss_and_slots(model, batches)[1]


def collateral(before: dict[int, torch.Tensor], after: dict[int, torch.Tensor]) -> float:
    """Fraction of probe lookups (position, layer, head) whose set of selected slots changed."""
    changed = total = 0
    for L in before:
        diff = (before[L] != after[L]).any(-1)  # (n, H)
        changed += int(diff.sum())
        total += diff.numel()
    return changed / max(total, 1)


def slots_replaced(before: dict[int, torch.Tensor], after: dict[int, torch.Tensor]) -> float:
    """Mean fraction of a probe lookup's k selected slots that are new (a finer view of collateral)."""
    new = total = 0
    for L in before:
        kept = (after[L][..., :, None] == before[L][..., None, :]).any(-1)  # (n, H, k)
        new += int((~kept).sum())
        total += kept.numel()
    return new / max(total, 1)


MEASURE_TOKENS = KEYS.measure_tokens  # tokens of text and of probe measured before and after


def text_sample(model: MemoryModel, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Evenly spaced passages of ``texts`` holding at most ``max_tokens`` tokens (all of them when they fit; always
    at least one passage), so a measurement's cost is bounded whatever the size of the text."""
    lengths = [len(model.encode(t)) + 1 for t in texts]
    total = sum(lengths)
    if total <= max_tokens:
        return list(texts)
    stride = -(-total // max_tokens)  # ceil: an even spread over the whole text, not its beginning
    out, n = [], 0
    for i in range(0, len(texts), stride):
        if out and n + lengths[i] > max_tokens:
            break
        out.append(texts[i])
        n += lengths[i]
    return out


@torch.no_grad()
def loss_and_slots(model: MemoryModel, batches) -> tuple[float, dict[int, torch.Tensor]]:
    """(token-weighted mean loss, each real position's selected slots {layer: (n_positions, H, k)}) in one pass."""
    total, count = 0.0, 0
    out: dict[int, list[torch.Tensor]] = {L: [] for L in model.memory_layers}
    for tokens, valid in batches:
        with capture_lookups(model) as rec:
            loss = lm_loss(model, tokens, valid)
        n = int(valid[:, 1:].sum())
        total += loss.item() * n
        count += n
        for L, (lk,) in rec.items():  # lm_loss reads tokens[:, :-1]: its positions are valid[:, :-1]
            out[L].append(lk.indices[valid[:, :-1].reshape(-1)].sort(-1).values)
    return total / max(count, 1), {L: torch.cat(v) for L, v in out.items()}


PROBE_TEXTS = KEYS.probe_texts  # background passages whose lookups measure an adaptation's or a route's collateral


def even_sample(items: Sequence, n: int) -> list:
    """At most ``n`` of ``items``, spread evenly from the first (every len // n-th); all of them when n is 0."""
    return list(items) if n == 0 else list(items[:: max(1, len(items) // n)][:n])


def probe_texts_for(model: MemoryModel, probe: list[str] | None, probe_from: str = "--probe",
                    fallback: list[str] | None = None, n: int = PROBE_TEXTS) -> tuple[list[str], str]:
    """The probe set and where it came from: ``probe`` (the user's), else an even sample of the model's demo-world
    corpus, else a sample of ``fallback`` (the user's own text)."""
    if probe is not None:
        return probe, probe_from
    if model.meta.get("world"):
        return even_sample(world_of(model).training_sentences(), n), "a sample of the demo world's corpus"
    if fallback:
        return even_sample(fallback, n), "the adapted text itself (no --probe given)"
    raise MemeditError("no background text to measure collateral on: pass --probe FILE (one passage per line)")
