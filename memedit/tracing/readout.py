"""What a slot writes: the one readout of a value row into the residual stream and the vocabulary.

A memory layer reads a weighted sum of value rows and projects it (memory.py, ``MemoryLayer.project``). For a
fixed token the layer output is linear in that sum (the exact contribution of memedit/tracing/trace.py), so one slot's
value row ``v`` writes, with weight 1 and without the bias,

    write(v)  = value_proj( v ⊙ gate ) · gating        (D,)  gate: silu(swilu_projection(x)), Memory+ only
                                                             gating: sigmoid(gating(x)), gated memories only
    logits(v) = (write(v) · norm_scale ⊙ norm.weight) @ output.weightᵀ     (vocab,)

``gate``, ``gating`` and ``norm_scale`` (``rsqrt(mean(h²) + eps)`` of the final residual ``h``) depend on the input
position. Without them (``None``) the readout is **position-independent**: gate and gating taken as 1 and the norm
scale as 1, i.e. the final norm contributes only its weight. `memedit export`, `memedit slot` and the report use
the position-independent readout; a trace (memedit/tracing/trace.py) passes the traced position's gate, gating and norm
scale, so a unit's direct logit attribution is exactly its softmax weight times ``logits(v)[target]``.

The tokens a slot *promotes* are the largest logits, the tokens it *suppresses* the smallest. Ids the tokenizer
cannot decode (a vocabulary padded past ``tokenizer.vocab_size``) are never listed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import MemeditError
from ..lm.tokenizer import token_text


@dataclass
class Readout:
    """The tensors of one memory layer's readout (float32), taken from a model or read lazily from a file."""

    value_proj: torch.Tensor | None  # (D, V) or None when the layer has no value projection
    norm_weight: torch.Tensor  # (D,) the final RMSNorm's weight
    unembed: torch.Tensor  # (vocab, D) the output matrix
    decodable: int  # ids below this are listed (tokenizer.vocab_size); padded ids above it are not

    @classmethod
    def of(cls, model, layer: int) -> Readout:
        """The readout of memory layer ``layer`` of ``model`` (a one-line error for a model without an unembedding)."""
        if layer not in model.memory_layers:
            raise MemeditError(f"layer {layer} is not a memory layer (memory layers: {list(model.memory_layers)})")
        if model.output is None:
            raise MemeditError("this is a standalone memory module with no host language model: a slot writes into "
                               "a residual stream that has no vocabulary to read it out in")
        mem = model.memory_layers[layer]
        vp = mem.value_proj.weight.detach().float() if mem.value_proj is not None else None
        tok = model.tokenizer
        vocab = model.output.weight.shape[0]
        return cls(value_proj=vp, norm_weight=model.norm.weight.detach().float(),
                   unembed=model.output.weight.detach().float(),
                   decodable=min(vocab, tok.vocab_size) if tok is not None else vocab)

    def writes(self, rows: torch.Tensor, gate: torch.Tensor | None = None,
               gating: torch.Tensor | float | None = None) -> torch.Tensor:
        """(B, D): what value rows (B, V) write to the residual stream, weight 1, no bias (module docstring)."""
        v = rows.float()
        if gate is not None:
            v = v * gate.float()
        out = v @ self.value_proj.T if self.value_proj is not None else v  # (B, D)
        if gating is not None:
            out = out * (gating.float() if isinstance(gating, torch.Tensor) else float(gating))
        return out

    def logits(self, rows: torch.Tensor, gate: torch.Tensor | None = None, gating: torch.Tensor | float | None = None,
               norm_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """(B, vocab): the logits value rows (B, V) write; ids the tokenizer cannot decode are NaN."""
        d = self.writes(rows, gate, gating) * self.norm_weight  # (B, D)
        if norm_scale is not None:
            d = d * (norm_scale.float() if isinstance(norm_scale, torch.Tensor) else float(norm_scale))
        logits = d @ self.unembed.T  # (B, vocab)
        if self.decodable < logits.shape[-1]:
            logits[:, self.decodable :] = float("nan")
        return logits


def top_tokens(logits: torch.Tensor, n: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n (values, ids) per row of logits (B, vocab), never an undecodable id (NaN)."""
    fill = float("-inf") if largest else float("inf")
    x = torch.nan_to_num(logits, nan=fill)
    top = x.topk(min(n, x.shape[-1]), dim=-1, largest=largest)
    return top.values, top.indices


@torch.no_grad()
def slot_writes(model, layer: int, slots: Sequence[int] | torch.Tensor, gate: torch.Tensor | None = None,
                gating: torch.Tensor | float | None = None, norm_scale: torch.Tensor | float | None = None,
                n: int = 5, readout: Readout | None = None, rows: torch.Tensor | None = None) -> list[dict]:
    """Per slot, what its value row writes through memory layer ``layer``: {"slot", "promotes", "suppresses"},
    each a list of (token text, logit), n of them, largest effect first.

    ``gate``, ``gating`` and ``norm_scale`` are those of one input position (see the module docstring); leave them
    None for the position-independent readout. ``readout`` and ``rows`` let a caller that read the tensors lazily
    (memedit/auditing/slot.py) pass them instead of a loaded model's.
    """
    ro = readout if readout is not None else Readout.of(model, layer)
    ids = torch.as_tensor(list(slots) if not isinstance(slots, torch.Tensor) else slots, dtype=torch.long)
    if rows is None:
        rows = model.memory_layers[layer].values.weight[ids]
    logits = ro.logits(rows, gate, gating, norm_scale)  # (B, vocab)
    tok = model.tokenizer if model is not None else None
    up_v, up_i = top_tokens(logits, n, True)
    dn_v, dn_i = top_tokens(logits, n, False)
    out = []
    for b, s in enumerate(ids.tolist()):
        out.append({
            "slot": s,
            "promotes": [(token_text(tok, i), float(v)) for v, i in zip(up_v[b], up_i[b], strict=True)
                         if v != float("-inf")],
            "suppresses": [(token_text(tok, i), float(v)) for v, i in zip(dn_v[b], dn_i[b], strict=True)
                           if v != float("inf")],
            # the token ids of the two lists, in order (--json shows each id beside its decoded text)
            "promote_ids": [int(i) for v, i in zip(up_v[b], up_i[b], strict=True) if v != float("-inf")],
            "suppress_ids": [int(i) for v, i in zip(dn_v[b], dn_i[b], strict=True) if v != float("inf")],
        })
    return out


@torch.no_grad()
def top_written_tokens(model, layer: int, k: int, budget: int = 1 << 23
                       ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yields (first slot, top-k promoted token ids (B, k), their logits (B, k)) over blocks of ``layer``'s value
    rows, position-independent readout. Blocks hold at most ``budget`` logits, so a 1M-slot table stays bounded in
    memory. Undecodable ids are never among the top (unless k exceeds the decodable vocabulary)."""
    ro = Readout.of(model, layer)
    # fold value_proj, the norm weight and the unembedding once: one (vocab, V) matrix, one matmul per block
    folded = Readout(value_proj=None, norm_weight=torch.ones(ro.value_proj.shape[1] if ro.value_proj is not None
                                                             else ro.unembed.shape[1]),
                     unembed=(ro.unembed * ro.norm_weight) @ ro.value_proj if ro.value_proj is not None
                     else ro.unembed * ro.norm_weight, decodable=ro.decodable)
    rows = model.memory_layers[layer].values.weight
    W = folded.unembed  # (vocab, V)
    block = min(max(1, budget // W.shape[0]), rows.shape[0])
    # two buffers for the whole table: a fresh (block, V) float32 upcast and (block, vocab) logits per block cost
    # more in page faults than the top-k itself (the allocator maps and unmaps them every time)
    up = torch.empty(block, W.shape[1], device=W.device)  # (block, V) the rows in float32
    logits = torch.empty(block, W.shape[0], device=W.device)  # (block, vocab)
    for start in range(0, rows.shape[0], block):
        b = min(block, rows.shape[0] - start)
        up[:b].copy_(rows[start : start + b])
        torch.mm(up[:b], W.T, out=logits[:b])  # what folded.logits computes (its norm weight is 1)
        if folded.decodable < logits.shape[-1]:
            logits[:b, folded.decodable :] = float("nan")  # as folded.logits
        torch.nan_to_num_(logits[:b], nan=float("-inf"))  # as top_tokens, in place: NaN is never among the top
        top = logits[:b].topk(min(k, logits.shape[-1]), dim=-1)
        yield start, top.indices, top.values
