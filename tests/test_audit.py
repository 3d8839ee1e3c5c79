"""`memedit audit`: slot statistics over a corpus, checked against hand-computed metrics and a slow recount."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memedit.auditing.audit import Corpus, audit
from memedit.auditing.stats import WEIGHT_SCALE, report, usage_metrics
from memedit.tracing.capture import capture_lookups

from .conftest import tiny_model

CORPUS = [
    "the cat sat on the mat .", "a dog ran in the park .", "Reidreir was born in Thakrian .",
    "the dog sat .", "a cat ran on the mat in the park .", "Thakrian .", "the park the park the park .",
]


def test_metrics_of_a_uniform_distribution():
    m = usage_metrics(torch.tensor([1, 1, 1, 1]))
    assert m["used"] == 100.0 and m["dead"] == 0
    assert m["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert m["entropy"] == pytest.approx(math.log(4))
    # C = cumsum(sorted p) = [.25, .5, .75, 1], mean .625 -> 1 - 1.25
    assert m["gini"] == pytest.approx(-0.25)
    assert (m["top50"], m["top90"], m["top99"]) == (2, 4, 4)
    assert m["top1pct_share"] == pytest.approx(0.25)  # the top 1% of 4 slots is one slot


def test_metrics_of_a_concentrated_distribution():
    m = usage_metrics(torch.tensor([0.0, 3.0, 0.0, 1.0]))
    plogp = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    assert m["used"] == 50.0 and m["dead"] == 2
    assert m["kl_uniform"] == pytest.approx(math.log(4) + plogp)
    assert m["entropy"] == pytest.approx(-plogp)
    # sorted p = [0, 0, .25, .75], C = [0, 0, .25, 1], mean .3125
    assert m["gini"] == pytest.approx(1 - 2 * 0.3125)
    assert (m["top50"], m["top90"], m["top99"]) == (1, 2, 2)
    assert m["top1pct_share"] == pytest.approx(0.75)
    one = usage_metrics(torch.tensor([0, 0, 0, 0, 0, 0, 0, 5]))
    assert one["gini"] == pytest.approx(1 - 2 / 8) and one["kl_uniform"] == pytest.approx(math.log(8))
    hub = usage_metrics(torch.cat([torch.full((100,), 9.0), torch.ones(9900)]))  # 10,000 slots, 100 hubs
    assert hub["top1pct_share"] == pytest.approx(900 / (900 + 9900))
    empty = usage_metrics(torch.zeros(4))
    assert empty["used"] == 0 and empty["dead"] == 4 and math.isnan(empty["gini"])


def slow_recount(model, texts):
    """Count selections one sentence, one position, one head, one rank at a time from captured lookups."""
    mem = model.config.memory
    S, N = mem.n_slots, mem.n_keys
    counts = {L: [[0] * S for _ in range(mem.heads)] for L in mem.layers}
    weights = {L: [[0.0] * S for _ in range(mem.heads)] for L in mem.layers}
    subkeys = {L: [[[0] * N, [0] * N] for _ in range(mem.heads)] for L in mem.layers}
    tokens = 0
    for text in texts:
        ids = model.encode(text)
        tokens += len(ids)
        with capture_lookups(model) as rec, torch.no_grad():
            model(torch.tensor([ids]))
        for L, (lk,) in rec.items():
            indices, w, stage1 = lk.indices.tolist(), lk.weights.tolist(), lk.stage1.tolist()  # plain lists
            for pos in range(len(ids)):
                for h in range(mem.heads):
                    for r in range(mem.knn):
                        slot = indices[pos][h][r]
                        counts[L][h][slot] += 1
                        weights[L][h][slot] += w[pos][h][r]
                    for half in (0, 1):
                        for i in stage1[pos][h][half]:
                            subkeys[L][h][half][i] += 1
    return counts, weights, subkeys, tokens


def assert_matches_recount(model, stats, texts):
    counts, weights, subkeys, tokens = slow_recount(model, texts)
    assert stats.tokens == tokens
    for li, L in enumerate(stats.layers):
        assert stats.counts[li].tolist() == counts[L]
        assert stats.subkey_counts[li].tolist() == subkeys[L]
        # batched and one-sentence forwards round float32 differently in the last bits; each access is also
        # rounded to 2^-32 units: allow 1e-6 per access
        tol = stats.counts[li].double() * (1e-6 + 0.5 / WEIGHT_SCALE)
        assert ((stats.weights[li] - torch.tensor(weights[L], dtype=torch.float64)).abs() <= tol).all()


def test_audit_counts_equal_a_slow_recount_with_padding_left_out():
    model = tiny_model()
    stats = audit(model, Corpus("test", texts=CORPUS), batch_size=3)  # batches mix lengths: padding is masked
    mem = model.config.memory
    assert stats.counts.sum() == stats.tokens * len(mem.layers) * mem.heads * mem.knn
    assert_matches_recount(model, stats, CORPUS)


def test_audits_of_shards_add_up_to_the_whole():
    model = tiny_model()
    whole = audit(model, Corpus("all", texts=CORPUS), batch_size=2)
    a = audit(model, Corpus("a", texts=CORPUS[:4]), batch_size=2)
    b = audit(model, Corpus("b", texts=CORPUS[4:]), batch_size=2)
    merged = a + b
    assert merged.tokens == whole.tokens
    assert torch.equal(merged.counts, whole.counts)
    assert torch.equal(merged.weight_units, whole.weight_units)
    assert torch.equal(merged.subkey_counts, whole.subkey_counts)


def test_report_covers_tables_layers_heads_and_subkeys():
    model = tiny_model(share_values=False)
    stats = audit(model, Corpus("test", texts=CORPUS))
    rows = report(stats)
    scopes = {(r["scope"], r["table"], r["layer"], r["head"], r["half"], r["basis"]) for r in rows}
    assert ("table", "layer0", None, None, None, "weight") in scopes
    assert ("layer", None, 2, None, None, "count") in scopes
    assert ("head", None, 2, 1, None, "weight") in scopes
    assert ("subkey", None, 0, 1, 1, "count") in scopes
    table0 = next(r for r in rows if r["scope"] == "table" and r["table"] == "layer0" and r["basis"] == "count")
    layer0 = next(r for r in rows if r["scope"] == "layer" and r["layer"] == 0 and r["basis"] == "count")
    assert table0 == {**layer0, "scope": "table", "table": "layer0", "layer": None}  # one reader: same use
    used = int((stats.counts[0].sum(0) > 0).sum())
    assert layer0["used"] == pytest.approx(100 * used / stats.n_slots) and layer0["dead"] == stats.n_slots - used


def test_cli_audit_text_and_jsonl_corpora(cli, tiny, tmp_path):
    _, path = tiny
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(CORPUS) + "\n\n")
    code, out, _ = cli("audit", txt, "--model", path, "--json")
    assert code == 0
    d = json.loads(out)
    model = tiny_model()
    assert d["tokens"] == sum(len(model.encode(t)) for t in CORPUS)
    shared = next(r for r in d["metrics"] if r["scope"] == "table" and r["basis"] == "count")
    assert 0 < shared["used"] <= 100 and shared["dead"] < 256
    jl = tmp_path / "corpus.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(CORPUS)))
    code, out2, _ = cli("audit", jl, "--model", path, "--json")
    assert code == 0 and json.loads(out2)["metrics"] == d["metrics"]
    code, out3, _ = cli("audit", txt, "--model", path, "--tokens", "10", "--json")
    assert code == 0 and json.loads(out3)["tokens"] == 10
    code, text, _ = cli("audit", txt, "--model", path, "--heads")
    assert code == 0 and "table shared" in text and "layer 2 h1" in text and "dead" in text


def test_cli_audit_bad_corpora_are_one_line_errors(cli, tiny, tmp_path):
    _, path = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = {
        empty: "no text",
        tmp_path / "missing.txt": "does not exist",
        tmp_path: "not a file",
    }
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"title": "no text field"}\n')
    cases[bad_json] = '"text"'
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 binary\n")
    cases[binary] = "UTF-8"
    for corpus, message in cases.items():
        code, _, err = cli("audit", corpus, "--model", path)
        assert code == 2, corpus
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = cli("audit", "--model", path)  # the tiny model records no facts world
    assert code == 2 and "CORPUS" in err


def test_cli_audit_plot_writes_a_png(cli, tiny, tmp_path):
    _, path = tiny
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(CORPUS) + "\n")
    png = tmp_path / "usage.png"
    code, out, _ = cli("audit", txt, "--model", path, "--plot", png)
    assert code == 0 and f"wrote {png}" in out.replace("\n", "")
    from matplotlib.image import imread

    img = imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 3 * img.shape[0]  # the curve and two heat maps side by side
    code, _, err = cli("audit", txt, "--model", path, "--plot", tmp_path / "usage.xyz")
    assert code == 2 and "plot" in err and not (tmp_path / "usage.xyz").exists()


def test_demo_model_audit_equals_a_slow_recount():
    """Acceptance: on the bundled demo model, counts equal an independent per-position recount."""
    import memedit
    from memedit.world.facts import world_of

    # Upcast: the stored bfloat16 value table rounds each value mix to bfloat16, which turns the last-bit
    # differences between a batched and a one-sentence forward into 1e-3 weight differences at the next layer.
    demo = memedit.load(dtype="float32")
    sentences = world_of(demo).training_sentences()[::499][:24]  # facts of many subjects, and filler
    stats = audit(demo, Corpus("demo sample", texts=sentences), batch_size=8)
    assert_matches_recount(demo, stats, sentences)


def test_cli_audit_of_the_demo_world_by_default(cli):
    code, out, _ = cli("audit", "--tokens", "3000", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["tokens"] == 3000 and "demo world" in d["corpus"]
    table = next(r for r in d["metrics"] if r["scope"] == "table" and r["basis"] == "weight")
    assert 0 < table["used"] < 100 and 0 < table["gini"] < 1
