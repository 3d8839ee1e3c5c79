"""The one readout (memedit/tracing/readout.py): the same answer as a trace's attributions and as the export's top
tokens."""

from __future__ import annotations

import pytest
import torch

import memedit
from memedit.tracing.readout import Readout, slot_writes, top_written_tokens
from memedit.tracing.trace import name

from .conftest import tiny_model

VARIANTS = [{}, {"gated": True, "share_values": False}, {"swilu_projection": False, "v_dim": 24}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_readout_at_a_position_gives_the_trace_attribution(variant):
    model = tiny_model(**variant)
    t = memedit.trace(model, "Reidreir was born in", "Thakrian")
    pos = t.position
    h = t["hook_resid_final"][pos].float()
    scale = torch.rsqrt(h.pow(2).mean() + model.norm.eps)
    for L in t.layers:
        attr, _ = t.attribution(L)
        w = t[name(L, "weights")][pos]
        units = t.units(L)
        gate = t[name(L, "gate")][pos] if name(L, "gate") in t else None
        gating = t[name(L, "gating")][pos] if name(L, "gating") in t else None
        logits = Readout.of(model, L).logits(model.memory_layers[L].values.weight[[u.slot for u in units]],
                                             gate, gating, scale)  # (H*k, vocab)
        expect = w.flatten() * logits[:, t.target.token_id]
        assert torch.allclose(expect, attr.flatten(), atol=1e-5)


def test_position_independent_readout_is_the_exports_top_tokens_and_skips_padded_ids():
    model = tiny_model()
    tok = model.tokenizer
    # pad the vocabulary past the tokenizer (as real checkpoints do) with an output row that would win everywhere
    V = tok.vocab_size
    out = torch.nn.Linear(model.config.dim, V + 3, bias=False)
    with torch.no_grad():
        out.weight[:V] = model.output.weight
        out.weight[V:] = 100 * model.output.weight[:3]
    model.output = out
    model.config.vocab_size = V + 3
    L = model.config.memory.layers[0]
    slots = [0, 7, 255]
    got = slot_writes(model, L, slots, n=4)
    first = next(top_written_tokens(model, L, 4))
    rows = model.memory_layers[L].values.weight[slots]
    mem = model.memory_layers[L]
    logits = (mem.value_proj(rows) - mem.value_proj.bias) * model.norm.weight @ model.output.weight[:V].T
    for b, s in enumerate(slots):
        want = logits[b].topk(4).indices.tolist()
        assert [t for t, _ in got[b]["promotes"]] == [tok.id_to_token(i) for i in want]
        assert first[1][s].tolist() == want  # export's top tokens
        assert [t for t, _ in got[b]["suppresses"]] == [tok.id_to_token(i) for i in (-logits[b]).topk(4).indices]
