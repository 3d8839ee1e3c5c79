"""`memedit keys adapt / revert / apply` as a user runs them."""

from __future__ import annotations

import json

import torch

from memedit.lm.batching import text_batches
from memedit.lm.hooks import keys_name
from memedit.storage.checkpoint import fingerprint, load
from memedit.storage.patch import Patch
from memedit.storage.state import write_frozen_rows
from memedit.tracing.capture import capture_lookups

from .conftest import TINY_TEXTS, tiny_model, write_texts


def stage1_rows(model, texts, L):
    """Every keys row that entered a stage-1 top-k of layer L while reading ``texts`` (the allowed updates)."""
    rows = set()
    N = model.config.memory.n_keys
    for tokens, valid in text_batches(model, texts, 64):
        with torch.no_grad(), capture_lookups(model) as rec:
            model(tokens[:, :-1])
        s1 = rec[L][0].stage1[valid[:, :-1].reshape(-1)]  # (n, H, 2, k)
        for h in range(s1.shape[1]):
            for half in range(2):
                rows |= {h * 2 * N + half * N + int(i) for i in s1[:, h, half].unique()}
    return rows


def test_adapt_lowers_loss_moves_only_stage1_subkeys_and_reverts_exactly(cli, tiny, tmp_path):
    model, path = tiny
    corpus = write_texts(tmp_path / "text.txt", TINY_TEXTS)
    probe = write_texts(tmp_path / "probe.txt", ["the dog sat in the park .", "a cat ran on the mat ."])
    base = fingerprint(model)
    code, out, _ = cli("keys", "adapt", corpus, "--model", path, "--probe", probe, "--steps", 6, "--lr", 2.0,
                       "--out", tmp_path / "p.safetensors", "--exact-index", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["loss_after"] < d["loss_before"]
    assert len(d["steps"]) == 6 and all(s["subkeys_changed"] > 0 for s in d["steps"])
    assert 0 < d["slots_replaced"] <= d["collateral"] <= 1 and d["probe_lookups"] > 0
    assert d["exact_lookups"] > 0 and d["exact_mismatches"] == 0  # the incremental index stayed exact
    assert d["subkeys_changed"] < d["subkeys_total"]
    # the folder now holds the adapted keys; the patch names only sub-key tensors
    adapted = load(path)
    assert fingerprint(adapted) != base
    patch = Patch.load(tmp_path / "p.safetensors")
    assert {c.name for c in patch.changes} == {keys_name(0), keys_name(2)}
    # every other tensor is bit-identical
    for name, t in model.state_dict().items():
        if not name.endswith(".keys"):
            assert torch.equal(t, adapted.state_dict()[name]), name
    code, out, _ = cli("keys", "revert", tmp_path / "p.safetensors", "--model", path)
    assert code == 0 and "reverted" in out
    assert fingerprint(load(path)) == base
    code, _, err = cli("keys", "revert", tmp_path / "p.safetensors", "--model", path)
    assert code == 2 and "is not applied" in err
    code, _, _ = cli("keys", "apply", tmp_path / "p.safetensors", "--model", path)
    assert code == 0 and fingerprint(load(path)) == fingerprint(adapted)


def test_one_step_moves_only_subkeys_that_entered_a_stage1_topk():
    from memedit.keyspace.adapt import adapt

    model = tiny_model()
    before = {L: m.keys.clone() for L, m in model.memory_layers.items()}
    res = adapt(model, TINY_TEXTS, TINY_TEXTS, steps=1, batch_size=len(TINY_TEXTS), lr=2.0)
    for L, m in model.memory_layers.items():
        moved = set(torch.nonzero((m.keys != before[L]).any(1)).flatten().tolist())
        allowed = stage1_rows(tiny_model(), TINY_TEXTS, L)
        assert moved and moved <= allowed and len(allowed) < m.keys.shape[0]
    assert res.subkeys_changed == sum(len(set(torch.nonzero((m.keys != before[L]).any(1)).flatten().tolist()))
                                      for L, m in model.memory_layers.items())


def test_frozen_subkeys_are_honoured(cli, tiny, tmp_path):
    model, path = tiny
    all_rows = torch.arange(model.memory_layers[0].keys.shape[0])
    write_frozen_rows(model, {"keys.layer0": all_rows})
    corpus = write_texts(tmp_path / "text.txt", TINY_TEXTS)
    code, out, _ = cli("keys", "adapt", corpus, "--model", path, "--probe", corpus, "--steps", 3, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["frozen_skipped"] > 0
    after = load(path)
    assert torch.equal(after.memory_layers[0].keys, model.memory_layers[0].keys)
    assert not torch.equal(after.memory_layers[2].keys, model.memory_layers[2].keys)


def test_dry_run_writes_nothing_and_bad_input_is_refused(cli, tiny, tmp_path):
    model, path = tiny
    corpus = write_texts(tmp_path / "text.txt", TINY_TEXTS)
    code, out, _ = cli("keys", "adapt", corpus, "--model", path, "--probe", corpus, "--steps", 2, "--dry-run")
    assert code == 0 and "nothing written" in out
    assert fingerprint(load(path)) == fingerprint(model)
    assert not (path / "memedit" / "patches").exists()
    empty = write_texts(tmp_path / "empty.txt", ["   "])
    code, _, err = cli("keys", "adapt", empty, "--model", path, "--probe", corpus)
    assert code == 2 and "tokenizes to nothing" in err
    # a user's model has no world to sample background text from: the adapted text itself is the probe, said once
    code, out, _ = cli("keys", "adapt", corpus, "--model", path, "--steps", 2, "--dry-run")
    assert code == 0 and "collateral is measured on the adapted text itself" in out and "--probe" in out
    code, _, err = cli("keys", "adapt", corpus, "--model", path, "--probe", corpus, "--layer", 1)
    assert code == 2 and "not a memory layer" in err
    (tmp_path / "junk.safetensors").write_bytes(b"not a patch")
    code, _, err = cli("keys", "revert", tmp_path / "junk.safetensors", "--model", path)
    assert code == 2 and "not a readable patch" in err


def test_the_bundled_model_is_refused(cli, demo, tmp_path):
    corpus = write_texts(tmp_path / "text.txt", ["hello ."])
    code, _, err = cli("keys", "adapt", corpus)
    assert code == 2 and "memedit convert" in err
    code, _, err = cli("keys", "route", "--prompt", "{} plays the", "--subject", "X", "--target", "harp")
    assert code == 2 and "memedit convert" in err


def test_adapt_on_heldout_phrasings_lowers_their_loss_on_the_demo_model(demo, tmp_path):
    from memedit.keyspace.adapt import adapt
    from memedit.storage.checkpoint import save
    from memedit.world.facts import world_of

    model = load(save(demo, tmp_path / "mine"))
    world = world_of(model)
    heldout = [f"{p} {f.target_true} ." for f in world.facts[:48] for p in f.heldout_paraphrases]
    res = adapt(model, heldout, world.training_sentences()[::400], steps=12, batch_size=32, lr=0.2,
                check_exact=True)
    assert res.loss_after < res.loss_before - 0.05
    assert res.exact_lookups > 0 and res.exact_mismatches == 0
    assert 0 < res.slots_replaced <= res.collateral
    assert res.probe_loss_after < res.probe_loss_before + 0.1  # background text barely affected


def test_key_patches_are_recorded_in_the_edit_log(cli, tiny, tmp_path):
    model, path = tiny
    corpus = write_texts(tmp_path / "text.txt", TINY_TEXTS)
    probe = write_texts(tmp_path / "probe.txt", ["the dog sat in the park ."])
    keys_before = {L: model.memory_layers[L].keys.detach().clone() for L in model.memory_layers}
    code, out, _ = cli("keys", "adapt", corpus, "--model", path, "--probe", probe, "--steps", 2, "--lr", 2.0, "--json")
    assert code == 0
    patch_file = json.loads(out)["patch"]
    patch = Patch.load(patch_file)
    code, out, _ = cli("patch", "log", "--model", path, "--json")
    log = json.loads(out)
    [entry] = log["entries"]
    assert entry["op"] == "apply" and entry["kind"] == "keys" and entry["id"] == patch.id
    assert log["applied"] == [patch.id]
    assert entry["rows"] == {c.name: c.rows.tolist() for c in patch.changes}
    assert entry["before"] == fingerprint(model) and entry["after"] == fingerprint(load(path))
    code, out, _ = cli("patch", "log", "--model", path, env={"COLUMNS": "250"})
    assert code == 0 and patch.id in out and "keys" in out

    code, _, _ = cli("keys", "revert", patch_file, "--model", path)
    assert code == 0
    code, out, _ = cli("patch", "log", "--model", path, "--json")
    log = json.loads(out)
    assert [e["op"] for e in log["entries"]] == ["apply", "revert"] and log["entries"][1]["id"] == patch.id
    assert log["applied"] == []
    reverted = load(path)
    for L, k in keys_before.items():
        now = reverted.memory_layers[L].keys.detach()
        assert k.view(torch.uint8).numpy().tobytes() == now.view(torch.uint8).numpy().tobytes()
    assert fingerprint(reverted) == fingerprint(model)


def test_a_step_runs_only_its_batch_and_measurements_use_a_bounded_sample():
    """Collateral and loss are measured once before and once after, on at most measure_tokens tokens: a step
    costs one forward pass of its own batch, however long the text and the probe are."""
    from memedit.keyspace.adapt import adapt
    from memedit.keyspace.subkeys import text_sample

    model = tiny_model()
    texts = [t for _ in range(20) for t in TINY_TEXTS]  # a long text
    sample = text_sample(model, texts, 60)
    assert 0 < sum(len(model.encode(t)) + 1 for t in sample) <= 60 < sum(len(model.encode(t)) + 1 for t in texts)
    assert sample != texts[: len(sample)]  # evenly spaced over the whole text, not its beginning
    assert text_sample(model, TINY_TEXTS, 10**6) == TINY_TEXTS
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    res = adapt(model, texts, texts, steps=5, batch_size=4, lr=2.0, measure_tokens=60)
    measure = len(text_batches(model, sample, 64))  # one batch of the sample, per measurement
    # 5 steps + the probe before and after: a probe that is the text itself is measured once for both
    assert len(calls) == 5 + 2 * measure
    assert calls.count(len(sample)) == 2 * measure and calls.count(4) == 5 and len(sample) != 4
    assert res.loss_before == res.probe_loss_before and res.loss_after == res.probe_loss_after
    assert res.probe_lookups == sum(len(model.encode(t)) for t in sample)  # every real position but the last
    assert 0 < res.slots_replaced <= res.collateral
