"""`memedit verify` as a user runs it, and proof that it catches real lookup bugs.

Each injected bug is a faulty lookup module swapped into ``layer.search`` (the one place every lookup goes
through); verify must flag it in that layer and only there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memedit.errors import MemeditError
from memedit.keyspace import exact
from memedit.lm.memory import Lookup, ProductKeySearch

from .conftest import TINY_TEXTS, tiny_model


# ---- injected bugs ---------------------------------------------------------------------------------------
class SwappedSlotIds(ProductKeySearch):
    """Bug: composes the slot id as j*N + i (second half major)."""

    def forward(self, query, keys):
        lk = super().forward(query, keys)
        i, j = lk.subkeys[..., 0], lk.subkeys[..., 1]
        return lk.replace(indices=j * self.n_keys + i)


class SmallStage1(ProductKeySearch):
    """Bug: stage 1 keeps only k1 < k sub-keys per half, so the k*k candidate grid is too small."""

    def __init__(self, n_keys, knn, k1):
        super().__init__(n_keys, knn)
        self.k1 = k1

    def forward(self, query, keys):
        n, H, K = query.shape
        N, k, k1 = self.n_keys, self.knn, self.k1
        sub = torch.einsum("nhpd,hpid->nhpi", query.view(n, H, 2, K // 2), keys)
        top, ids = sub.topk(k1, dim=-1)
        cand = (top[:, :, 0].unsqueeze(-1) + top[:, :, 1].unsqueeze(-2)).view(n, H, k1 * k1)
        scores, best = cand.topk(k, dim=-1)
        i, j = ids[:, :, 0].gather(-1, best // k1), ids[:, :, 1].gather(-1, best % k1)
        return Lookup(i * N + j, torch.stack([i, j], -1), scores, F.softmax(scores.float(), -1), ids)


class StaleKeys(ProductKeySearch):
    """Bug: searches a copy of the sub-keys taken earlier, so a later change to a sub-key is not seen."""

    def __init__(self, n_keys, knn, keys):
        super().__init__(n_keys, knn)
        self.stale = keys.detach().clone()

    def forward(self, query, keys):
        return super().forward(query, self.stale.to(query.dtype))


def run_random(model, n=400, dtypes=(torch.float32,)):
    return exact.verify(model, exact.random_source(n, seed=1), "random", list(dtypes))


def mismatches_by_layer(report):
    out = {}
    for p in report.passes:
        for h in p.heads:
            out[h.layer] = out.get(h.layer, 0) + h.mismatches
    return out


# ---- a correct lookup agrees -------------------------------------------------------------------------------
def test_verify_cli_random_queries_agree_in_float32_and_bfloat16(cli, tiny):
    _, path = tiny
    code, out, _ = cli("verify", "--model", path, "--random", 500, "--dtypes", "float32,bfloat16", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["ok"] is True and [p["dtype"] for p in d["passes"]] == ["float32", "bfloat16"]
    f32, bf16 = d["passes"]
    # 2 memory layers x 2 heads x 500 queries, every one checked against FAISS
    assert f32["lookups"] == bf16["lookups"] == 2000
    assert all(h["agreement"] == 1.0 and h["mismatches"] == 0 for p in d["passes"] for h in p["heads"])
    # float32 agrees to the last bits; bfloat16 ties a lot at the k-th place, which must not count as a mismatch
    assert max(h["max_score_diff"] for h in f32["heads"]) < 1e-5
    assert bf16["ties"] > f32["ties"]
    assert bf16["identical"] + bf16["tie_agree"] == pytest.approx(1.0)


def test_verify_cli_text_queries_table(cli, tiny, tmp_path):
    _, path = tiny
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TINY_TEXTS) + "\n")
    code, out, _ = cli("verify", "--model", path, "--corpus", corpus, "--save-queries", tmp_path / "q.npz")
    assert code == 0
    assert "all lookups agree with the exact reference search" in out and "bfloat16" in out
    # the saved queries check again without any tokenizer, as a standalone memory would
    saved = np.load(tmp_path / "q.npz")
    assert sorted(saved.files) == ["layer0", "layer2"] and saved["layer0"].shape[1:] == (2, 16)
    np.save(tmp_path / "l2.npy", saved["layer2"])
    code, out, _ = cli("verify", "--model", path, "--queries", tmp_path / "l2.npy", "--layer", 2, "--json")
    assert code == 0
    d = json.loads(out)
    assert {h["layer"] for h in d["passes"][0]["heads"]} == {2}
    assert d["passes"][0]["heads"][0]["lookups"] == saved["layer2"].shape[0]


def test_verify_corpus_of_the_demo_model_agrees(demo):
    from memedit.world.facts import world_of

    texts = world_of(demo).training_sentences()[::50]
    report = exact.verify(demo, exact.corpus_source(texts, limit=600), "demo", [demo.dtype, torch.bfloat16])
    assert report.ok
    assert all(h.lookups == 600 for p in report.passes for h in p.heads)


# ---- injected bugs are flagged -----------------------------------------------------------------------------
def test_slot_id_composed_second_half_major_is_flagged():
    model = tiny_model()
    layer = model.memory_layers[2]
    layer.search = SwappedSlotIds(layer.cfg.n_keys, layer.cfg.knn)
    report = run_random(model)
    assert not report.ok
    bad = mismatches_by_layer(report)
    assert bad[2] > 300 and bad[0] == 0  # only the faulty layer, and nearly every lookup
    ex = next(h for h in report.passes[0].heads if h.examples).examples[0]
    assert ex.reason == "a reported score is not its slot's score"
    assert sorted(ex.memedit_scores) == pytest.approx(sorted(ex.faiss_scores), rel=1e-5)  # values alone look right


def test_stage1_smaller_than_k_is_flagged():
    model = tiny_model(knn=6)
    for layer in model.memory_layers.values():
        layer.search = SmallStage1(layer.cfg.n_keys, layer.cfg.knn, k1=3)
    report = run_random(model)
    assert not report.ok
    assert all(v > 0 for v in mismatches_by_layer(report).values())
    reasons = {ex.reason for p in report.passes for h in p.heads for ex in h.examples}
    assert "scores differ from the exact top-k" in reasons


def test_perturbed_subkey_not_reflected_in_the_lookup_is_flagged():
    model = tiny_model()
    layer = model.memory_layers[0]
    layer.search = StaleKeys(layer.cfg.n_keys, layer.cfg.knn, layer.keys4d)
    assert run_random(model).ok  # before the change, the stale copy is still right
    with torch.no_grad():  # move one half-1 sub-key of head 1 far out: its row of slots now wins often
        layer.keys4d[1, 0, 5] += 3.0 * layer.keys4d[1, 0].norm(dim=-1).max()
    report = run_random(model)
    assert not report.ok
    heads = {(h.layer, h.head): h.mismatches for h in report.passes[0].heads}
    assert heads[(0, 1)] > 0 and heads[(0, 0)] == 0 and heads[(2, 0)] == heads[(2, 1)] == 0


def test_cli_exit_code_1_on_a_real_mismatch(cli, tiny, monkeypatch):
    _, path = tiny
    original = ProductKeySearch.forward

    def swapped(self, query, keys):  # the same bug, patched into every lookup the CLI's model makes
        lk = original(self, query, keys)
        return lk.replace(indices=lk.subkeys[..., 1] * self.n_keys + lk.subkeys[..., 0])

    monkeypatch.setattr(ProductKeySearch, "forward", swapped)
    code, out, _ = cli("verify", "--model", path, "--random", 50, "--dtypes", "float32", "--examples", 1)
    assert code == 1
    assert "LOOKUP ERRORS" in out and "memedit slots" in out and "reference slots" in out


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_with_exit_2(cli, tiny, tmp_path):
    _, path = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, _, err = cli("verify", "--model", path, "--corpus", empty)
    assert code == 2 and "tokenizes to nothing" in err and len(err.strip().splitlines()) == 1
    np.save(tmp_path / "bad.npy", np.zeros((3, 5, 7), dtype=np.float32))
    code, _, err = cli("verify", "--model", path, "--queries", tmp_path / "bad.npy", "--layer", 0)
    assert code == 2 and "expected (n, 2, 16)" in err
    code, _, err = cli("verify", "--model", path, "--queries", tmp_path / "bad.npy")
    assert code == 2 and "--layer" in err
    code, _, err = cli("verify", "--model", path, "--random", 5, "--layer", 1)
    assert code == 2 and "not a memory layer" in err
    code, _, err = cli("verify", "--model", path, "--random", 5, "--dtypes", "int8")
    assert code == 2 and "unknown dtype" in err
    code, _, err = cli("verify", "--model", path, "--random", 5, "--reference", "ivf")
    assert code == 2 and "unknown --reference 'ivf'" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("verify", "--model", path)
    assert code == 2 and "--corpus" in err  # a model without a facts world needs text


def test_k_larger_than_n_is_refused():
    model = tiny_model()
    layer = model.memory_layers[0]
    layer.search = ProductKeySearch(layer.cfg.n_keys, layer.cfg.n_keys + 1)
    with pytest.raises(MemeditError, match="knn 17 > N 16"):
        run_random(model)


def test_blockwise_search_equals_one_block():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 32, 8, generator=g).numpy()
    q = torch.randn(50, 16, generator=g).numpy()
    d1, i1 = exact.exact_search(q, keys, 10, block_bytes=1)  # one sub-key row per block
    d2, i2 = exact.exact_search(q, keys, 10, block_bytes=1 << 30)
    full = exact.slot_keys(keys)  # (1024, 16), slot i*N + j
    assert np.array_equal(full[33], np.concatenate([keys[0][1], keys[1][1]]))
    assert np.array_equal(i1, i2) and np.allclose(d1, d2)
    brute = np.argsort(-(q @ full.T), axis=1)[:, :10]
    assert np.array_equal(np.sort(i1, 1), np.sort(brute, 1))
    import faiss  # and FAISS's own flat search over the same keys

    d3, i3 = faiss.knn(np.ascontiguousarray(q, dtype=np.float32), full, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert np.array_equal(np.sort(i1, 1), np.sort(i3, 1)) and np.allclose(d1, d3, rtol=1e-5)


def test_standalone_memory_module_verifies_from_query_vectors(cli, tmp_path):
    from product_key_memory import PKM

    torch.manual_seed(0)
    torch.save(PKM(dim=32, heads=2, num_keys=64, topk=8, dim_head=16).eval().state_dict(), tmp_path / "pkm.pt")
    code, out, _ = cli("verify", "--model", tmp_path / "pkm.pt", "--random", 300, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["ok"] and {h["layer"] for h in d["passes"][0]["heads"]} == {0}
    assert d["passes"][0]["lookups"] == 600  # 2 heads x 300
    np.save(tmp_path / "q.npy", np.random.default_rng(0).standard_normal((50, 2, 32)).astype(np.float32))
    code, out, _ = cli("verify", "--model", tmp_path / "pkm.pt", "--queries", tmp_path / "q.npy", "--json")
    assert code == 0 and json.loads(out)["passes"][0]["lookups"] == 100  # one memory: no --layer needed
    (tmp_path / "t.txt").write_text("some text\n")
    code, _, err = cli("verify", "--model", tmp_path / "pkm.pt", "--corpus", tmp_path / "t.txt")
    assert code == 2 and "query vectors" in err


# ---- FAISS MultiIndexQuantizer as a second reference ----------------------------------------------------------
def test_miq_reference_agrees_with_the_brute_force_and_flags_the_same_bug(cli, tiny):
    g = torch.Generator().manual_seed(3)
    for N in (16, 12):  # 12: padded to a power of two inside miq_search
        keys, q = torch.randn(2, N, 8, generator=g).numpy(), (torch.randn(300, 16, generator=g) * 4).numpy()
        d1, i1 = exact.exact_search(q, keys, 5)
        d2, i2 = exact.miq_search(q, keys, 5)
        # MIQ's answers are judged like any reference: well-formed, and agreeing once rescored exactly
        assert exact.answer_faults(i2, d2, N * N) == [None] * 300
        tol = exact.MIQ_RTOL * exact.score_scale(q, keys)
        t1, t2 = exact.true_scores(q, keys, i1), exact.true_scores(q, keys, i2)
        kinds = [exact.judge(i2[r], d2[r], t2[r], i1[r], t1[r], tol[r])[0] for r in range(300)]
        assert set(kinds) <= {"same", "tie"} and kinds.count("same") > 290
    _, path = tiny
    code, out, _ = cli("verify", "--model", path, "--random", 300, "--reference", "miq", "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    model = tiny_model()
    layer = model.memory_layers[2]
    layer.search = SwappedSlotIds(layer.cfg.n_keys, layer.cfg.knn)
    report = exact.verify(model, exact.random_source(400, seed=1), "random", [torch.float32], reference="miq")
    bad = mismatches_by_layer(report)
    assert bad[2] > 300 and bad[0] == 0


# ---- a faulty reference is not the lookup's fault ----------------------------------------------------------
def tied_model_folder(tmp_path):
    """A tiny model whose half-2 sub-keys 3 and 7 are equal in every head: slots i*N + 3 and i*N + 7 tie exactly."""
    from memedit.storage.checkpoint import save

    model = tiny_model()
    with torch.no_grad():
        for layer in model.memory_layers.values():
            layer.keys4d[:, 1, 7] = layer.keys4d[:, 1, 3]  # (H, 2, N, K/2)
    return save(model, tmp_path / "tied")


def duplicating_inside_ties(monkeypatch) -> list[int]:
    """Make FAISS's MIQ answer return the same slot twice where two slots tie (as it was seen to do at a million
    slots): the real search, then the second slot of each exact tie replaced by the first. Returns a counter."""
    real = exact.miq_search
    made = [0]

    def faulty(queries, keys, k, index=None):
        D, ids = real(queries, keys, k, index)
        ids = ids.copy()
        for r in range(ids.shape[0]):
            tie = np.flatnonzero((D[r, 1:] == D[r, :-1]) & (ids[r, 1:] != ids[r, :-1]))
            if len(tie):
                ids[r, tie[0] + 1] = ids[r, tie[0]]
                made[0] += 1
        return D, ids

    monkeypatch.setattr(exact, "miq_search", faulty)
    return made


def test_a_duplicated_slot_inside_a_tie_is_a_reference_fault_and_the_lookup_is_still_proven(cli, tmp_path,
                                                                                               monkeypatch):
    path = tied_model_folder(tmp_path)
    made = duplicating_inside_ties(monkeypatch)
    code, out, _ = cli("verify", "--model", path, "--random", 300, "--reference", "miq", "--dtypes", "float32")
    assert made[0] > 20  # the faulty reference really was faulty, many times
    assert code == 0
    assert "reference fault" in out and "returned twice" in out and "judged by the brute force" in out
    assert "all lookups agree" in out
    code, out, _ = cli("verify", "--model", path, "--random", 300, "--reference", "miq", "--dtypes", "float32",
                       "--json")
    p = json.loads(out)["passes"][0]
    assert code == 0 and p["mismatches"] == 0 and p["unproven"] == 0
    assert p["reference_faults"] == p["rechecked"] > 0
    assert p["identical"] + p["tie_agree"] == pytest.approx(1.0)  # every lookup judged, by MIQ or the brute force


def test_a_wrong_lookup_is_a_lookup_error_even_with_a_faulty_reference(cli, tmp_path, monkeypatch):
    path = tied_model_folder(tmp_path)
    duplicating_inside_ties(monkeypatch)
    original = ProductKeySearch.forward

    def small_stage1(self, query, keys):  # the lookup drops its best slot and repeats its second
        lk = original(self, query, keys)
        bad = lk.indices.clone()
        bad[..., 0] = bad[..., 1]
        return lk.replace(indices=bad)

    monkeypatch.setattr(ProductKeySearch, "forward", small_stage1)
    code, out, _ = cli("verify", "--model", path, "--random", 100, "--reference", "miq", "--dtypes", "float32",
                       "--json")
    p = json.loads(out)["passes"][0]
    assert code == 1 and p["mismatches"] == p["lookups"] == 400  # 2 layers x 2 heads x 100, every one wrong
    code, out, _ = cli("verify", "--model", path, "--random", 100, "--reference", "miq", "--dtypes", "float32")
    assert code == 1 and "lookup error" in out and "LOOKUP ERRORS" in out


def test_the_bundled_model_verifies_against_miq(cli):
    """Seed 2 is where FAISS's MIQ returned one slot twice (float32, layer 1 head 1) and verify blamed the lookup."""
    code, out, _ = cli("verify", "--random", 2000, "--reference", "miq", "--seed", 2, "--dtypes", "float32",
                       "--json")
    p = json.loads(out)["passes"][0]
    assert code == 0 and p["mismatches"] == 0 and p["unproven"] == 0 and p["lookups"] == 16000
    assert p["rechecked"] == p["reference_faults"] + p["reference_errors"]


def test_a_pass_in_another_dtype_shares_the_value_table_and_agrees():
    """--dtypes bfloat16 on a float32 model computes in bfloat16 without copying or converting the value table
    (at a million slots that copy was gigabytes): the lookups run in bfloat16 and agree with FAISS."""
    model = tiny_model()
    half = exact.in_dtype(model, torch.bfloat16)
    assert half.table("shared").weight is model.table("shared").weight
    assert half.dtype == torch.bfloat16 and half.table("shared").weight.dtype == torch.float32
    assert model.dtype == torch.float32 and model.output.weight.dtype == torch.float32  # the original untouched
    assert half.output.weight.dtype == torch.bfloat16
    report = exact.verify(model, exact.corpus_source(TINY_TEXTS), "text", [torch.bfloat16])
    assert report.ok and report.passes[0].lookups > 0
    checked = exact.corpus_source(TINY_TEXTS)(model, torch.bfloat16)
    assert all(c.queries.dtype == torch.bfloat16 for c in checked.values())


def test_verify_reports_progress_per_head_over_all_passes():
    model = tiny_model()
    seen: list[tuple[int, int]] = []
    report = exact.verify(model, exact.random_source(20), "random", [torch.float32, torch.bfloat16],
                          progress=lambda done, total: seen.append((done, total)))
    assert report.ok
    assert seen == [(i, 8) for i in range(1, 9)]  # 2 passes x 2 layers x 2 heads
