"""The one slot counter (memedit.tracing.capture.SlotCounter) behind the audit, background statistics, edit ranking
and routing: its counts equal the lookups' own selections, counted here from capture_lookups."""

from __future__ import annotations

import torch

from memedit.editing.background import compute
from memedit.editing.sparse_ft import fact_counts
from memedit.keyspace.route import slot_usage
from memedit.lm.batching import pad_batch, pad_id
from memedit.tracing.capture import SlotCounter, capture_lookups, on_lookup

from .conftest import TINY_TEXTS, tiny_model

SENTENCES = TINY_TEXTS * 3 + ["the dog sat .", "a cat ran ."]


def selections(model, seqs):
    """Per table, (position, rows read at it) for each real position of each sequence, from the lookups."""
    tokens, lengths = pad_batch(seqs, pad_id(model))
    B, T = tokens.shape
    with torch.no_grad(), capture_lookups(model) as rec:
        model(tokens)
    out = {t.name: [] for t in model.tables}
    for t in model.tables:
        for b in range(B):
            for p in range(int(lengths[b])):
                rows = torch.cat([rec[L][0].indices[b * T + p].flatten() for L in t.layers])
                out[t.name].append((b, p, rows))
    return out


def test_background_counts_and_document_frequency():
    model = tiny_model(share_values=False)
    bg = compute(model, SENTENCES, batch_size=4, seed=0)
    # the same shuffle and batches as compute, counted by hand
    import random

    order = list(SENTENCES)
    random.Random(0).shuffle(order)
    got = selections(model, [model.encode(s) for s in order])
    for t in model.tables:
        reads = torch.zeros(t.n_rows, dtype=torch.long)
        df = torch.zeros(t.n_rows, dtype=torch.long)
        per_batch: dict[int, set[int]] = {}
        for b, _, rows in got[t.name]:
            reads += torch.bincount(rows, minlength=t.n_rows)
            per_batch.setdefault(b // 4, set()).update(rows.tolist())
        for rows in per_batch.values():
            df[list(rows)] += 1
        assert torch.equal(bg.counts[t.name], reads) and reads.sum() > 0
        assert torch.equal(bg.df[t.name], df)
    assert bg.n_batches == 3 and bg.tokens == sum(len(model.encode(s)) for s in SENTENCES)


def test_fact_counts_count_the_answer_position_only():
    model = tiny_model()
    prompts = ["the cat sat on the", "Reidreir was born in"]
    counts = fact_counts(model, prompts)
    got = selections(model, [model.encode(p) for p in prompts])
    (name,) = counts
    want = torch.zeros_like(counts[name])
    for b, p, rows in got[name]:
        if p == len(model.encode(prompts[b])) - 1:
            want += torch.bincount(rows, minlength=want.numel()).float()
    assert torch.equal(counts[name], want) and want.sum() > 0


def test_slot_usage_counts_every_real_position():
    model = tiny_model()
    (name,) = [t.name for t in model.tables]
    counts, source = slot_usage(model, name, SENTENCES)
    tok = model.tokenizer
    got = selections(model, [model.encode(s) + [tok.eos_id] for s in SENTENCES])
    want = sum(torch.bincount(rows, minlength=counts.numel()) for _, _, rows in got[name])
    assert torch.equal(counts, want) and "counted over" in source


def test_per_head_and_per_table_counts_agree_with_the_lookups():
    model = tiny_model()  # two memory layers sharing one table
    seqs = [model.encode(s) for s in SENTENCES]
    tokens, lengths = pad_batch(seqs, pad_id(model))
    keep = (torch.arange(tokens.shape[1]) < lengths[:, None]).flatten()
    by_head, by_table = SlotCounter(model, by_head=True, weights=True), SlotCounter(model)
    with torch.no_grad(), capture_lookups(model) as rec:
        for counter in (by_head, by_table):
            counter.batch(keep)
            with on_lookup(model, counter):
                model(tokens)
    (name,) = by_head.tables
    assert by_head.counts.shape == (2, 2, 256) and by_table.counts.shape == (1, 1, 256)
    for li, L in enumerate(by_head.layers):
        lk = rec[L][0]
        for h in range(by_head.heads):
            idx, w = lk.indices[keep][:, h].flatten(), lk.weights[keep][:, h].flatten().double()
            assert torch.equal(by_head.counts[li, h], torch.bincount(idx, minlength=256))
            want = torch.zeros(256, dtype=torch.float64).index_add_(0, idx, w)
            assert torch.allclose(by_head.weight_units[li, h].double() / 2**32, want, atol=1e-6)
    assert torch.equal(by_head.table_reads(name), by_table.table_reads(name))
    assert int(by_table.table_reads(name).sum()) == int(keep.sum()) * 2 * 2 * 4  # positions x layers x H x k
