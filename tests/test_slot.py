"""`memedit slot ID`: one slot's sub-keys, readout, usage, top contexts, frozen state and edits."""

from __future__ import annotations

import json

from memedit.auditing.audit import Corpus, audit
from memedit.auditing.hdf5 import write_audit
from memedit.auditing.slot import slot_info
from memedit.editing.freeze import freeze
from memedit.editing.patch import apply, row_patch
from memedit.storage.checkpoint import load

from .test_audit import CORPUS


def test_slot_view_from_the_folder_equals_the_loaded_model_and_shows_usage_contexts_frozen_and_edits(tiny, tmp_path):
    model, path = tiny
    stats = audit(model, Corpus("tiny", texts=CORPUS), batch_size=4, contexts=3)
    counts = stats.table_counts("shared").sum(0)
    slot = int(counts.argmax())
    apply(model, row_patch(model, "scale", "shared", [slot, slot + 1], scalar=2.0, message="double it"))
    freeze(model, {"shared": [slot]})
    audit_file = write_audit(tmp_path / "a.h5", stats)
    lazy = slot_info(path, slot, stats=audit_file, n=3)
    loaded = slot_info(load(path), slot, stats=audit_file, n=3)
    assert json.dumps(lazy, sort_keys=True) == json.dumps(loaded, sort_keys=True)
    N = model.config.memory.n_keys
    assert (lazy["i"], lazy["j"]) == divmod(slot, N) and lazy["layers"] == [0, 2]
    keys = model.memory_layers[2].keys4d
    assert lazy["sub_keys"][1]["heads"][1]["j_norm"] == float(keys[1, 1, slot % N].norm())
    assert lazy["value_norm"] == float(load(path).table("shared").weight[slot].norm())
    assert lazy["frozen"] is True
    assert [e["kind"] for e in lazy["edits"]] == ["scale"] and lazy["edits"][0]["touched"] == ["value row"]
    u = lazy["usage"]
    assert u["count"] == int(counts[slot]) and u["rank"] == 1
    assert sum(h["count"] for h in u["heads"]) == u["count"]
    assert [c["weight"] for c in lazy["contexts"]] == [c["weight"] for c in stats.contexts.entries("shared", slot)]
    c = lazy["contexts"][0]
    assert c["text"][8] == model.tokenizer.id_to_token(c["tokens"][8])
    assert len(lazy["writes"]) == 2 and len(lazy["writes"][0]["promotes"]) == 3


def test_slot_cli_json_and_one_line_errors(cli, tiny):
    _, path = tiny
    code, out, _ = cli("slot", "5", "--model", path, "--json")
    assert code == 0 and json.loads(out)["slot"] == 5 and json.loads(out)["usage"] is None
    code, _, err = cli("slot", "256", "--model", path)
    assert code == 2 and "outside 0..255" in err and len(err.strip().splitlines()) == 1
    code, out, _ = cli("slot", "5", "--model", path)
    assert code == 0 and "promotes" in out and "sub-key norms" in out
