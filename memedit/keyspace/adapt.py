"""`memedit keys adapt`: online sparse adaptation of the sub-keys on a text stream.

Each step (one batch, SGD on the LM loss) moves only sub-keys that entered a stage-1 top-k in that batch; frozen
sub-keys and every other parameter stay fixed. The change is returned as a reversible :class:`Patch`
(memedit/storage/patch.py) that `keys adapt` applies to the model folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import limits
from ..errors import MemeditError
from ..lm.batching import text_batches
from ..lm.hooks import keys_name
from ..lm.model import MemoryModel
from ..storage.patch import Patch, from_tensors
from ..storage.store import fingerprint
from ..tracing.capture import capture_lookups
from . import exact
from .config import KEYS
from .subkeys import collateral, frozen_key_rows, lm_loss, loss_and_slots, slots_replaced, text_loss, text_sample


@dataclass
class AdaptStep:
    step: int
    loss: float  # the batch's loss before this step's update
    subkeys_changed: int  # sub-keys this step moved (entered a stage-1 top-k, got a gradient, not frozen)
    slots_reindexed: int  # slot keys rewritten in the incremental exact index


@dataclass
class AdaptResult:
    steps: list[AdaptStep]
    loss_before: float  # mean loss over (a sample of) the adapted text before any step
    loss_after: float
    probe_loss_before: float  # mean loss over (a sample of) the probe (background) text
    probe_loss_after: float
    collateral: float  # fraction of probe lookups whose selected slots differ after adaptation
    slots_replaced: float  # mean fraction of a probe lookup's k slots that differ after adaptation
    probe_lookups: int  # probe positions measured (per layer and head)
    subkeys_changed: int  # distinct sub-keys changed overall
    subkeys_total: int
    frozen_skipped: int  # frozen sub-keys that entered a stage-1 top-k and were left alone
    exact_lookups: int  # probe lookups checked against the incrementally updated FAISS index
    exact_mismatches: int
    patch: Patch  # the sub-key rows it changed (the model holds the new ones)

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("patch", "steps")}
        d["steps"] = [s.__dict__ for s in self.steps]
        return d


def adapt(
    model: MemoryModel,
    texts: Sequence[str],
    probe: Sequence[str],
    steps: int = KEYS.steps,
    batch_size: int = KEYS.batch_size,
    lr: float = KEYS.lr,
    layers: Sequence[int] | None = None,
    check_exact: bool = False,
    progress: Callable[[AdaptStep], None] | None = None,
    measure_tokens: int = KEYS.measure_tokens,
) -> AdaptResult:
    """Online sparse adaptation of the sub-keys on ``texts``: each step (one batch, SGD on the LM loss) moves only
    sub-keys that entered a stage-1 top-k in that batch; frozen sub-keys and every other parameter stay fixed.

    A step costs one batch's forward and backward pass. Loss and collateral are measured once before and once
    after, on evenly spaced samples of at most ``measure_tokens`` tokens of ``texts`` and of ``probe``.

    ``check_exact``: keep every head's slot keys in a FAISS index updated incrementally, and check the probe
    lookups against it at the end. It holds N² × K float32 per head (2 GiB at N 1024, K 512), so only when asked.
    """
    limits.count(steps, "--steps", 1, limits.MAX_ADAPT_STEPS)
    limits.count(batch_size, "--batch-size", 1, limits.MAX_BATCH_SIZE)
    limits.number(lr, "--lr", 0.0, limits.MAX_LR)
    layers = list(layers or model.memory_layers)
    for L in layers:
        if L not in model.memory_layers:
            raise MemeditError(f"layer {L} is not a memory layer (memory layers: {list(model.memory_layers)})")
    mem = {L: model.memory_layers[L] for L in layers}
    frozen = frozen_key_rows(model)
    batches = text_batches(model, texts, batch_size)
    text_texts = text_sample(model, texts, measure_tokens)
    text_measured = text_batches(model, text_texts, 64)
    probe_texts = text_sample(model, probe, measure_tokens)
    probe_batches = text_batches(model, probe_texts, 64)
    # without a probe of its own (the CLI's fallback) the probe sample is the text sample: measure it once
    same = probe_texts == text_texts
    base_fp = fingerprint(model)
    before = {keys_name(L): m.keys.detach().clone() for L, m in mem.items()}
    probe_loss_before, probe_slots = loss_and_slots(model, probe_batches)
    loss_before = probe_loss_before if same else text_loss(model, text_measured)
    indexes = {L: exact.layer_indexes(m) for L, m in mem.items()} if check_exact else {}

    model.requires_grad_(False)
    for m in mem.values():
        m.keys.requires_grad_(True)
    history, changed_any = [], {L: torch.zeros(m.keys.shape[0], dtype=torch.bool) for L, m in mem.items()}
    skipped = {L: torch.zeros_like(v) for L, v in changed_any.items()}
    try:
        for step in range(steps):
            tokens, valid = batches[step % len(batches)]
            with capture_lookups(model) as rec, torch.enable_grad():
                loss = lm_loss(model, tokens, valid)
                loss.backward()
            n_changed = 0
            with torch.no_grad():
                for L, m in mem.items():
                    N = m.cfg.n_keys
                    stage1 = rec[L][0].stage1[valid[:, :-1].reshape(-1)]  # (n, H, 2, k) sub-key ids per half
                    H = stage1.shape[1]
                    base = (torch.arange(H)[:, None] * 2 * N + torch.arange(2)[None, :] * N)  # (H, 2) row offsets
                    rows = (stage1 + base[None, :, :, None]).unique()
                    mask = torch.zeros(m.keys.shape[0], dtype=torch.bool)
                    mask[rows] = True
                    skipped[L] |= mask & frozen[L]
                    mask &= ~frozen[L]
                    grad = m.keys.grad * mask[:, None]
                    moved = grad.ne(0).any(1)
                    m.keys.sub_(lr * grad)
                    m.keys.grad = None
                    changed_any[L] |= moved
                    n_changed += int(moved.sum())
            reindexed = sum(exact.sync_indexes(indexes[L], m) for L, m in mem.items()) if check_exact else 0
            st = AdaptStep(step + 1, loss.item(), n_changed, reindexed)
            history.append(st)
            if progress:
                progress(st)
    finally:
        for m in mem.values():
            m.keys.requires_grad_(False)
            m.keys.grad = None
    probe_loss_after, now = loss_and_slots(model, probe_batches)
    n_exact = n_bad = 0
    if check_exact:
        checked = exact.corpus_queries(model, probe_texts, limit=2048)
        heads = exact.compare({L: checked[L] for L in mem}, exact.rtol_for(model.dtype), indexes=indexes)
        n_exact, n_bad = sum(h.lookups for h in heads), sum(h.mismatches for h in heads)
    patch = from_tensors(model, before, base=base_fp, kind="keys",
                         info={"command": "keys adapt", "steps": steps, "lr": lr})
    patch.message = f"keys adapt ({patch.n_rows} rows)"
    return AdaptResult(
        history, loss_before, probe_loss_after if same else text_loss(model, text_measured), probe_loss_before,
        probe_loss_after,
        collateral(probe_slots, now), slots_replaced(probe_slots, now), len(next(iter(now.values()))),
        sum(int(v.sum()) for v in changed_any.values()), sum(m.keys.shape[0] for m in mem.values()),
        sum(int(v.sum()) for v in skipped.values()), n_exact, n_bad, patch)
