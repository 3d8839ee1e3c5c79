"""Native model folders: bit-exact round trips, shared tables stored once, clear errors for bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from memedit.errors import MemeditError
from memedit.storage.checkpoint import fingerprint, load, save

from .conftest import tiny_model


def test_round_trip_is_bit_exact(tmp_path):
    m = tiny_model()
    path = save(m, tmp_path / "m")
    back = load(path)
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    tokens = torch.tensor([[1, 5, 6, 7]])
    assert torch.equal(m(tokens), back(tokens))
    assert fingerprint(m) == fingerprint(back)


def test_shared_table_is_stored_once_and_stays_shared(tmp_path):
    path = save(tiny_model(share_values=True), tmp_path / "m")
    names = load_file(str(path / "model.safetensors")).keys()
    assert "layers.0.feed_forward.values.weight" in names
    assert "layers.2.feed_forward.values.weight" not in names
    back = load(path)
    assert [t.layers for t in back.tables] == [[0, 2]]
    assert back.memory_layers[0].values is back.memory_layers[2].values


def test_unshared_tables_are_one_per_layer(tmp_path):
    back = load(save(tiny_model(share_values=False), tmp_path / "m"))
    assert [(t.name, t.layers) for t in back.tables] == [("layer0", [0]), ("layer2", [2])]


def test_bfloat16_round_trip(tmp_path):
    m = tiny_model().to(torch.bfloat16)
    back = load(save(m, tmp_path / "m"))
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.tables[0].weight, m.tables[0].weight)


def test_truncated_weights_give_a_clear_error(tmp_path):
    path = save(tiny_model(), tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(MemeditError, match="corrupt or truncated"):
        load(path)


def test_wrong_shape_is_named(tmp_path):
    path = save(tiny_model(), tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    state["layers.0.feed_forward.keys"] = torch.zeros(3, 3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(MemeditError, match=r"layers\.0\.feed_forward\.keys has shape \(3, 3\)"):
        load(path)


def test_config_that_does_not_match_the_weights(tmp_path):
    path = save(tiny_model(), tmp_path / "m")
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["memory"]["layers"] = [0, 1]
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(MemeditError, match="does not match its config"):
        load(path)


def test_save_refuses_a_non_empty_folder_and_leaves_it_alone(tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(MemeditError, match="not empty"):
        save(tiny_model(), dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_missing_path(tmp_path):
    with pytest.raises(MemeditError, match="does not exist"):
        load(tmp_path / "nope")
