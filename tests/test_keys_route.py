"""`memedit keys route` as a user runs it: a new fact lands in a free slot, with measured collateral."""

from __future__ import annotations

import json

import torch

from memedit.keyspace.route import route
from memedit.lm.hooks import keys_name
from memedit.storage.checkpoint import fingerprint, load
from memedit.storage.patch import Patch
from memedit.storage.state import write_frozen_rows
from memedit.tracing.capture import answer_lookups
from memedit.world.evaluate import last_logits

from .conftest import TINY_TEXTS, tiny_model, write_texts


def test_route_on_tiny_model_selects_the_slot_and_predicts_the_target(cli, tiny, tmp_path):
    model, path = tiny
    probe = write_texts(tmp_path / "bg.txt", TINY_TEXTS)
    code, out, _ = cli("keys", "route", "--prompt", "{} was born in", "--subject", "Reidreir", "--target", "park",
                       "--probe", probe, "--model", path, "--out", tmp_path / "r.safetensors", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["predicted_after"] == "park" and d["p_after"] > d["p_before"]
    assert d["slot_uses"] == 0  # a slot no background passage reads
    # the folder's model now selects the slot for the fact's query, in the reported layer and head
    routed = load(path)
    lk = answer_lookups(routed, ["Reidreir was born in"])[d["layer"]]
    assert d["slot"] in lk.indices[0, d["head"]].tolist()
    i, j = d["subkeys"]
    assert d["slot"] == i * 16 + j
    # only two sub-key rows and one value row changed, and the patch reverts them exactly
    patch = Patch.load(tmp_path / "r.safetensors")
    assert {c.name: c.rows.numel() for c in patch.changes} == {
        keys_name(d["layer"]): 2, "layers.0.feed_forward.values.weight": 1}
    # the edit log names the value row by its table, and `patch revert` points to `keys revert`
    [entry] = json.loads(cli("patch", "log", "--model", path, "--json")[1])["entries"]
    assert entry["kind"] == "keys" and entry["id"] == patch.id
    assert entry["rows"] == {keys_name(d["layer"]): patch.change(keys_name(d["layer"])).rows.tolist(),
                             "shared": [d["slot"]]}
    # one patch type: `patch revert ID` undoes a key patch as `keys revert FILE` does
    code, _, err = cli("patch", "revert", patch.id, "--model", path)
    assert code == 0 and fingerprint(load(path)) == fingerprint(model)
    code, _, _ = cli("keys", "apply", tmp_path / "r.safetensors", "--model", path)
    assert code == 0 and fingerprint(load(path)) == fingerprint(routed)
    code, _, _ = cli("keys", "revert", tmp_path / "r.safetensors", "--model", path)
    assert code == 0 and fingerprint(load(path)) == fingerprint(model)


def test_route_moves_subkeys_little_and_respects_a_given_slot():
    model = tiny_model()
    res = route(model, "{} was born in", "Reidreir", "park", slot=77, layer=2, background_texts=TINY_TEXTS)
    assert (res.slot, res.layer, res.subkeys) == (77, 2, (4, 13))
    assert res.slot_choice == "given" and res.predicted_after == "park"
    assert max(res.moved) < max(res.subkey_norms)  # a nudge, not a replacement
    lk = answer_lookups(model, ["Reidreir was born in"])[2]
    assert 77 in lk.indices[0, res.head].tolist()


def test_route_bad_input(cli, tiny, tmp_path):
    model, path = tiny
    probe = write_texts(tmp_path / "bg.txt", TINY_TEXTS)
    base = ["keys", "route", "--prompt", "{} was born in", "--subject", "Reidreir", "--model", path, "--probe", probe]
    code, _, err = cli(*base, "--target", "park", "--slot", 256)
    assert code == 2 and "slot id 256 is out of range 0..255" in err
    code, _, err = cli(*base, "--target", "park", "--slot", "many")
    assert code == 2 and "--slot" in err
    code, _, err = cli(*base, "--target", "park", "--layer", 1)
    assert code == 2 and "not a memory layer" in err
    write_frozen_rows(model, {"shared": torch.tensor([5])})
    code, _, err = cli(*base, "--target", "park", "--slot", 5)
    assert code == 2 and "frozen" in err
    assert fingerprint(load(path)) == fingerprint(model)  # nothing written on any error


def test_route_a_new_fact_on_the_demo_model_keeps_other_facts(demo, tmp_path):
    from memedit.storage.checkpoint import save
    from memedit.world.facts import world_of

    model = load(save(demo, tmp_path / "mine"))
    world = world_of(model)
    fact = world.facts[7]
    # keys route writes one next token, and every object of the BPE demo world is 2+ tokens: route the fact to a
    # word of the world's filler sentences, which is one token
    new = "museum"
    assert len(model.tokenizer.encode(" " + new)) == 1
    text = fact.prompt.format(fact.subject)
    others = world.facts[::6]
    res = route(model, fact.prompt, fact.subject, new, background_texts=world.training_sentences()[::4],
                probe=world.training_sentences()[::100], facts=others)
    tok = model.tokenizer
    assert tok.decode([int(last_logits(model, [text])[0].argmax())]).strip() == new
    assert res.predicted_after == " " + new and res.slot_uses == 0  # the token
    assert res.facts_checked > 1500
    assert res.facts_accuracy_before - res.facts_accuracy_after <= 0.01  # at most 1 point
