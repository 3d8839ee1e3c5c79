"""Tracing a fact: exact per-slot decomposition, attributions, batched ablations, `memedit inspect`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import memedit
from memedit.storage.checkpoint import BUNDLED
from memedit.tracing.capture import core_set, on_lookup
from memedit.tracing.trace import name

from .conftest import tiny_model

PROMPT = "Reidreir was born in"
VARIANTS = {
    "swilu, shared": {},
    "swilu, gated, per-layer tables": {"gated": True, "share_values": False},
    "no swilu, V != D": {"swilu_projection": False, "v_dim": 24},
    "no projection": {"swilu_projection": False},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_slot_contributions_plus_bias_equal_the_layer_output(variant):
    model = tiny_model(**VARIANTS[variant])
    t = memedit.trace(model, "the cat sat on the mat", "park")
    for L in t.layers:
        for pos in range(t.T):
            c, bias = t.contributions(L, pos)
            H, k = model.config.memory.heads, model.config.memory.knn
            assert c.shape == (H, k, model.config.dim)
            out = t[name(L, "out")][pos]
            assert torch.allclose(c.sum((0, 1)) + bias, out, atol=1e-4, rtol=0)


def test_attributions_sum_to_the_layer_attribution_and_the_logit():
    model = tiny_model()
    t = memedit.trace(model, PROMPT, "Thakrian")
    d = t.logit_direction()
    # the frozen-scale final norm reproduces the target's logit exactly at this point
    logit = model(t.tokens[None])[0, -1, t.target.token_id]
    assert t["hook_resid_final"][-1] @ d == pytest.approx(float(logit), abs=1e-4)
    for L in t.layers:
        attr, bias_attr = t.attribution(L)
        layer_attr = float(t[name(L, "out")][-1] @ d)
        assert float(attr.sum()) + bias_attr == pytest.approx(layer_attr, abs=1e-4)
        # a unit's attribution is its weight times what its value row writes for the target
        w = t[name(L, "weights")][-1]
        for u, a, wt in list(zip(t.units(L), attr.flatten(), w.flatten(), strict=True))[:4]:
            row = t.writes(u, n=model.config.vocab_size)
            logit_of_target = dict(row["promotes"])[t.target.token]
            assert float(a) == pytest.approx(float(wt) * logit_of_target, abs=1e-5)


def test_batched_ablation_matches_dropping_one_slot_at_a_time():
    model = tiny_model()
    t = memedit.trace(model, PROMPT, "Thakrian")
    base = t.logprobs[-1, t.target.token_id]
    assert t.logprob == pytest.approx(float(base), abs=1e-6)  # a one-token target
    checked = 0
    for L in t.layers:
        abl = t.ablation(L)
        assert abl.shape == (model.config.memory.heads, model.config.memory.knn)
        for h, r in [(0, 0), (1, 2)]:
            # independent path: the weights of the k-1 remaining slots are a softmax over their scores
            def drop(layer, lk, h=h, r=r, L=L):
                if layer != L:
                    return None
                scores = lk.scores.float().clone()
                scores[-1, h, r] = float("-inf")
                return lk.replace(weights=F.softmax(scores, -1))

            with on_lookup(model, drop):
                lp = torch.log_softmax(model(t.tokens[None])[0, -1].float(), -1)[t.target.token_id]
            assert float(abl[h, r]) == pytest.approx(float(lp - base), abs=1e-5)
            checked += 1
    assert checked == 4


def test_dropping_every_slot_of_a_layer_equals_a_zeroed_memory_read():
    model = tiny_model(swilu_projection=False)  # out = m: a head that reads nothing writes nothing
    t = memedit.trace(model, PROMPT, "Thakrian")
    lp = t.drop([t.units(2)])[0]  # every slot of the last memory layer at the answer position

    def zero_last(layer, lk):
        if layer != 2:
            return None
        w = lk.weights.clone()
        w[-1] = 0
        return lk.replace(weights=w)

    with on_lookup(model, zero_last):
        ref = torch.log_softmax(model(t.tokens[None])[0, -1].float(), -1)[t.target.token_id]
    assert float(lp) == pytest.approx(float(ref), abs=1e-5)


def test_inspect_json_schema(cli, tiny):
    _, path = tiny
    code, out, _ = cli("inspect", PROMPT, "--target", "Thakrian", "--model", path, "--json")
    assert code == 0
    d = json.loads(out)
    assert 0 < d["target"]["prob"] < 1 and d["target"]["rank"] >= 1 and d["target"]["token"] == "Thakrian"
    assert len(d["top"]) == 5 and abs(sum(x["prob"] for x in d["top"])) <= 1
    assert [x["layer"] for x in d["layers"]] == [0, 2]
    for layer in d["layers"]:
        assert len(layer["heads"]) == 2
        for h in layer["heads"]:
            assert len(h["slots"]) == 4
            assert sum(s["weight"] for s in h["slots"]) == pytest.approx(1, abs=1e-5)
            for s in h["slots"]:
                assert {"slot", "i", "j", "score", "weight", "attribution", "ablation", "read_by"} <= s.keys()
                assert s["slot"] == s["i"] * 16 + s["j"]
                assert layer["layer"] in s["read_by"]
    top = d["top_slots"]
    assert len(top) == 10 and [s["attribution"] for s in top] == sorted((s["attribution"] for s in top), reverse=True)
    assert len(top[0]["promotes"]) == 5 and len(top[0]["suppresses"]) == 5


def test_inspect_tables_and_all_positions(cli, tiny):
    _, path = tiny
    code, out, _ = cli("inspect", PROMPT, "--model", path, "--all-positions")
    assert code == 0
    assert "memory layer 0" in out and "memory layer 2" in out and "top 10 slots" in out
    assert "no target given" in out and "every position" in out
    code, out, _ = cli("inspect", PROMPT, "--model", path, "--all-positions", "--json")
    d = json.loads(out)
    assert [p["position"] for p in d["positions"]] == list(range(len(d["tokens"])))
    assert d["positions"][1]["scored"]["token"] == "was"  # earlier positions score the prompt's next token


def test_inspect_bad_input_is_one_line(cli, tiny):
    _, path = tiny
    code, _, err = cli("inspect", "", "--model", path)
    assert code == 2 and "no tokens" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("inspect", PROMPT, "--target", "Zzyzx", "--model", path)
    assert code == 2 and "not in the model's vocabulary" in err
    code, _, err = cli("inspect", "--model", path)
    assert code == 2 and "--fact" in err
    code, out, _ = cli("inspect", PROMPT, "--target", "Thakrian park", "--model", path, "--json")
    tg = json.loads(out)["target"]
    assert code == 0 and tg["tokens"] == ["Thakrian", "park"] and tg["logprob"] == pytest.approx(
        sum(tg["token_logprobs"]), abs=1e-5)
    for hostile in ("[/b] was {0} born in [bold]", "a {} b } {", "x" * 20):
        code, out, err = cli("inspect", hostile, "--target", "park", "--model", path)
        assert code == 0 and hostile[:12].replace("[", "") in out.replace("[", ""), err


def test_a_multi_token_target_is_scored_whole():
    model = tiny_model()
    t = memedit.trace(model, PROMPT, "Thakrian park .")
    ids = model.encode(PROMPT)
    want = model.tokenizer.encode(" Thakrian park .")
    assert t.target.token_ids == want and t.target.n_tokens == 3 and t.target.joined
    # an independent forward over prompt + target: the sum of the target's token log-probs
    lp = torch.log_softmax(model(torch.tensor([ids + want]))[0].float(), -1)
    ref = sum(float(lp[len(ids) - 1 + i, w]) for i, w in enumerate(want))
    assert t.logprob == pytest.approx(ref, abs=1e-4)
    assert t.target_positions == [len(ids) - 1, len(ids), len(ids) + 1]
    # an ablation at the second target position changes only that position and later ones
    pos = t.target_positions[1]
    L = t.layers[0]
    u = t.units(L, pos)[0]

    def drop(layer, lk):
        if layer != L:
            return None
        scores = lk.scores.float().clone()
        scores[pos, u.head, 0] = float("-inf")
        return lk.replace(weights=F.softmax(scores, -1))

    with on_lookup(model, drop):
        lp2 = torch.log_softmax(model(t.tokens[None])[0].float(), -1)
    ref2 = sum(float(lp2[len(ids) - 1 + i, w]) for i, w in enumerate(want))
    assert float(t.ablation(L, pos)[u.head, 0]) == pytest.approx(ref2 - t.logprob, abs=1e-5)
    assert torch.allclose(lp2[: pos], lp[: pos], atol=1e-6)
    d = t.to_dict()
    assert [p["position"] for p in d["per_token"]] == t.target_positions
    assert d["summary"] == sorted(d["summary"], key=lambda r: r["ablation"])


def _fact_file(tmp_path):
    rec = {"id": "r1", "prompt": "{} was born in", "subject": "Reidreir", "target_true": "Thakrian",
           "paraphrases": ["the cat sat on the", "Reidreir ran in the"], "heldout_paraphrases": ["a dog sat on"]}
    p = tmp_path / "facts.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    return p


def test_inspect_fact_from_a_file(cli, tiny, tmp_path):
    model, path = tiny
    facts = _fact_file(tmp_path)
    code, out, _ = cli("inspect", "--fact", "r1", "--facts", facts, "--model", path, "--json")
    assert code == 0
    d = json.loads(out)
    prompts = ["Reidreir was born in", "the cat sat on the", "Reidreir ran in the", "a dog sat on"]
    assert [p["prompt"] for p in d["phrasings"]] == prompts
    assert [p["heldout"] for p in d["phrasings"]] == [False, False, False, True]
    # the core set is taken over the training phrasings; --heldout adds the held-out ones
    assert d["core_set"] == core_set(model, prompts[:3]) and d["core_size"] == len(d["core_set"]["shared"])
    assert d["core_over"] == 3
    code, out, _ = cli("inspect", "--fact", "r1", "--facts", facts, "--model", path, "--json", "--heldout")
    assert json.loads(out)["core_set"] == core_set(model, prompts) and json.loads(out)["core_over"] == 4
    for p in d["phrasings"]:
        assert (p["flip"] is None or p["flip"] >= 1) if p["answered"] else p["flip"] is None
    code, _, err = cli("inspect", "--fact", "nope", "--facts", facts, "--model", path)
    assert code == 2 and "unknown fact id 'nope'" in err


def test_trace_causal_grid_and_plot(cli, tiny, tmp_path):
    _, path = tiny
    png = tmp_path / "trace.png"
    code, out, _ = cli("trace-causal", PROMPT, "--subject", "Reidreir", "--target", "Thakrian", "--model", path,
                       "--plot", png, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["subject_positions"] == [1] and d["samples"] == 10 and d["layers"] == [0, 2]
    grid = torch.tensor(d["restored"])
    assert grid.shape == (len(d["tokens"]), 2)
    # restoring before the subject changes nothing: those positions were not corrupted
    assert torch.allclose(grid[0], torch.tensor(d["corrupted_prob"]), atol=1e-6)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli("trace-causal", PROMPT, "-s", "Reidreir", "-t", "Thakrian", "--model", path, "--noise", "0",
                       "--json")
    d = json.loads(out)
    assert d["corrupted_prob"] == pytest.approx(d["clean_prob"], abs=1e-6)
    assert max(abs(x) for row in d["indirect_effect"] for x in row) < 1e-6
    code, out, _ = cli("trace-causal", PROMPT, "-s", "Reidreir", "-t", "Thakrian", "--model", path)
    assert code == 0 and "indirect effect" in out and "'Reidreir'*" in out
    code, _, err = cli("trace-causal", PROMPT, "--subject", "Bob", "--target", "Thakrian", "--model", path)
    assert code == 2 and "does not occur in the prompt" in err


demo_only = pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="the bundled demo model is not built yet")


@demo_only
def test_top_attributed_slots_matter_more_than_random_ones(demo):
    from memedit.tracing.trace import top_vs_random
    from memedit.world.facts import world_of

    facts = world_of(demo).facts
    facts = facts[:: max(1, len(facts) // 40)][:40]  # 40 facts spread over the world
    r = top_vs_random(demo, facts, n_drop=10, seed=0)
    assert r["facts_answered"] >= 20
    assert r["lowered_top"] >= 0.9
    assert r["lowered_top"] > r["lowered_random"]
    assert r["mean_prob_top"] < r["mean_prob_random"]


@demo_only
def test_inspect_a_demo_fact(cli, demo):
    from memedit.world.facts import world_of

    fact = world_of(demo).facts[0]
    code, out, _ = cli("inspect", "--fact", fact.id, "--json")
    assert code == 0
    d = json.loads(out)
    n_train = len(fact.training_prompts)
    assert d["target"] == fact.target_true and len(d["phrasings"]) == n_train + len(fact.heldout_paraphrases)
    assert all(p["answered"] for p in d["phrasings"][:n_train])  # the training phrasings are answered
    assert d["core_size"] >= 1 and all(isinstance(s, int) for s in d["core_set"]["shared"])
    assert all(p["flip"] is None or p["flip"] >= 1 for p in d["phrasings"][:n_train])


def test_plot_without_matplotlib_is_a_clear_error(cli, tiny, tmp_path, monkeypatch):
    import sys

    _, path = tiny
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, _, err = cli("trace-causal", PROMPT, "-s", "Reidreir", "-t", "Thakrian", "--model", path,
                       "--samples", "2", "--plot", tmp_path / "x.png")
    assert code == 2 and "pip install 'memedit[plot]'" in err and not (tmp_path / "x.png").exists()


@demo_only
def test_the_example_prints_a_core_set(demo):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from memedit.world.facts import world_of

    script = Path(__file__).parent.parent / "examples" / "inspect_fact.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny batches: extra threads only wait on a busy machine
    r = subprocess.run([sys.executable, str(script), "f00000"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    n_train = len(world_of(demo).fact("f00000").training_prompts)
    assert f"core set (slots selected by all {n_train} training phrasings)" in r.stdout
    assert "table shared: [" in r.stdout
