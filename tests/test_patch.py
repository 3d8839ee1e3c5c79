"""Value patches as a user makes them: set/add/scale/zero/copy, apply, revert byte for byte, show, log, diff,
and every bad input refused with a one-line error, exit 2 and nothing changed on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from memedit.editing.patch import Patch, apply, make_patch, revert
from memedit.errors import MemeditError
from memedit.storage.checkpoint import load, save

from .conftest import tiny_model


def folder_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a model folder (state included) by relative name; the writers' lock file (empty when no
    writer holds it) is not the model's content."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "lock"}


def test_set_apply_then_revert_restores_bytes(cli, tiny, tmp_path):
    model, path = tiny
    original = (path / "model.safetensors").read_bytes()
    V = model.table("shared").weight.shape[1]
    np.save(tmp_path / "new.npy", np.full((2, V), 0.25, dtype=np.float32))
    code, out, err = cli("patch", "set", "-m", path, "--table", "shared", "--rows", "5,9", "--values",
                         tmp_path / "new.npy", "--apply", "--json", "--message", "two rows")
    assert code == 0, err
    res = json.loads(out)
    assert res["applied"] and res["tables"][0]["rows"] == [5, 9] and res["tables"][0]["layers"] == [0, 2]
    edited = load(path)
    assert torch.all(edited.table("shared").weight[[5, 9]] == 0.25)
    assert torch.equal(edited.table("shared").weight[6], model.table("shared").weight[6])

    code, out, _ = cli("patch", "log", "-m", path, "--json")
    log = json.loads(out)
    assert [e["op"] for e in log["entries"]] == ["apply"] and log["applied"] == [res["id"]]
    assert log["entries"][0]["message"] == "two rows" and log["entries"][0]["layers"] == [0, 2]

    code, out, err = cli("patch", "revert", res["id"], "-m", path)
    assert code == 0, err
    assert (path / "model.safetensors").read_bytes() == original
    code, out, _ = cli("patch", "log", "-m", path, "--json")
    assert [e["op"] for e in json.loads(out)["entries"]] == ["apply", "revert"] and json.loads(out)["applied"] == []


def test_shared_table_patch_names_every_layer(cli, tiny):
    _, path = tiny
    code, out, _ = cli("patch", "zero", "-m", path, "--table", "shared", "--rows", "3", "--apply")
    assert code == 0
    assert "read by layers 0, 2: all of them change" in out


def test_each_operation_writes_what_it_says(tiny, tmp_path):
    from memedit.editing.patch import row_patch

    model, _ = tiny
    w = model.table("shared").weight.detach().clone()
    assert torch.equal(row_patch(model, "add", "shared", [1], scalar=1.0).changes[0].new[0], w[1] + 1.0)
    assert torch.equal(row_patch(model, "scale", "shared", [1, 2], scalar=2.0).changes[0].new, w[[1, 2]] * 2)
    assert torch.equal(row_patch(model, "copy", "shared", [4], from_row=7).changes[0].new[0], w[7])
    assert torch.equal(row_patch(model, "add", "shared", [4], from_row=7).changes[0].new[0], w[4] + w[7])
    assert not row_patch(model, "zero", "0", [0]).changes[0].new.any()
    # a patch written to a file and read back is the same patch, and show prints it
    p = row_patch(model, "set", "shared", [3, 1], scalar=0.5, message="hello")
    p.save(tmp_path / "p.safetensors")
    q = Patch.load(tmp_path / "p.safetensors")
    assert q.id == p.id and q.message == "hello" and q.changes[0].rows.tolist() == [1, 3]
    assert torch.equal(q.changes[0].old, w[[1, 3]])


def test_patch_file_apply_and_twice_refused(cli, tiny, tmp_path):
    _, path = tiny
    f = tmp_path / "p.safetensors"
    code, _, _ = cli("patch", "add", "-m", path, "-t", "shared", "-r", "2-4", "--scalar", "0.5", "-o", f)
    assert code == 0 and f.is_file()
    code, out, _ = cli("patch", "show", f, "--json")
    assert json.loads(out)["tables"][0]["rows"] == [2, 3, 4]
    assert cli("patch", "apply", f, "-m", path)[0] == 0
    before = folder_bytes(path)
    code, _, err = cli("patch", "apply", f, "-m", path)
    assert code == 2 and "already applied" in err and len(err.strip().splitlines()) == 1
    assert folder_bytes(path) == before


def test_stale_base_refused_then_forced_with_warning_and_revertible(cli, tiny, tmp_path):
    _, path = tiny
    original = (path / "model.safetensors").read_bytes()
    f = tmp_path / "p.safetensors"
    cli("patch", "set", "-m", path, "-t", "shared", "-r", "2", "--scalar", "1.0", "-o", f)
    assert cli("patch", "set", "-m", path, "-t", "shared", "-r", "2", "--scalar", "3.0", "--apply")[0] == 0
    code, _, err = cli("patch", "apply", f, "-m", path)
    assert code == 2 and "differ from the patch's base" in err
    code, out, err = cli("patch", "apply", f, "-m", path, "--force", "--json")
    assert code == 0 and "warning" in err
    assert load(path).table("shared").weight[2].eq(1.0).all()
    # revert both, newest first: the original bytes come back
    ids = json.loads(cli("patch", "log", "-m", path, "--json")[1])["applied"]
    for i in reversed(ids):
        assert cli("patch", "revert", i, "-m", path)[0] == 0
    assert (path / "model.safetensors").read_bytes() == original


@pytest.mark.parametrize("args, message", [
    (["set", "-t", "shared", "-r", "256", "--scalar", "1"], "out of range"),
    (["set", "-t", "shared", "-r", "1", "--scalar", "nan"], "NaN or inf"),
    (["set", "-t", "shared", "-r", "1", "--values", "{wide}"], "width"),
    (["set", "-t", "shared", "-r", "1", "--values", "{inf}"], "NaN or inf"),
    (["set", "-t", "nope", "-r", "1", "--scalar", "1"], "no value table"),
    (["set", "-t", "shared", "-r", "1-x", "--scalar", "1"], "bad row spec"),
    (["zero", "-t", "shared", "-r", "1", "--apply"], "frozen"),
])
def test_bad_input_is_one_line_exit_2_nothing_changed(cli, tiny, tmp_path, args, message):
    from memedit.storage.state import write_frozen_rows

    model, path = tiny
    write_frozen_rows(model, {"shared": torch.tensor([1])})
    np.save(tmp_path / "wide.npy", np.zeros((1, 7), dtype=np.float32))
    np.save(tmp_path / "inf.npy", np.full((1, 32), np.inf, dtype=np.float32))
    before = folder_bytes(path)
    args = [a.format(wide=tmp_path / "wide.npy", inf=tmp_path / "inf.npy") for a in args]
    code, _, err = cli("patch", *args, "-m", path, "-o", tmp_path / "out.safetensors")
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert folder_bytes(path) == before and not (tmp_path / "out.safetensors").exists()


def test_patch_for_another_model_is_refused(cli, tiny, tmp_path):
    _, path = tiny
    other = save(tiny_model(seed=1), tmp_path / "other")
    f = tmp_path / "p.safetensors"
    cli("patch", "zero", "-m", other, "-t", "shared", "-r", "1", "-o", f)
    before = folder_bytes(path)
    code, _, err = cli("patch", "apply", f, "-m", path)
    assert code == 2 and "made for another model" in err and len(err.strip().splitlines()) == 1
    assert folder_bytes(path) == before


def test_bundled_model_is_refused(cli, tmp_path):
    code, _, err = cli("patch", "zero", "-t", "shared", "-r", "1", "--apply")
    assert code == 2 and "read-only" in err


def test_diff_lists_rows_that_differ(cli, tiny, tmp_path):
    model, path = tiny
    copy = save(model, tmp_path / "copy")
    code, out, _ = cli("patch", "diff", path, copy, "--json")
    assert json.loads(out)["identical"]
    cli("patch", "add", "-m", copy, "-t", "shared", "-r", "7,11", "--scalar", "0.5", "--apply")
    code, out, _ = cli("patch", "diff", path, copy, "--json")
    d = json.loads(out)
    assert d["tables"][0]["rows"] == [7, 11] and d["tables"][0]["max_delta"] == pytest.approx(0.5, abs=1e-6)
    assert not d["other_tensors"]


def test_unshared_tables_are_patched_separately(tmp_path):
    path = save(tiny_model(share_values=False), tmp_path / "m")
    model = load(path)
    p = make_patch(model, {"layer2": ([0], torch.zeros(1, 32))})
    apply(model, p)
    m2 = load(path)
    assert not m2.table("layer2").weight[0].any() and m2.table("layer0").weight[0].any()
    assert p.changes[0].layers == [2]
    revert(m2, p.id)
    with pytest.raises(MemeditError, match="not applied"):
        revert(m2, p.id)


# ---- the patch files of memedit < 0.2 ------------------------------------------------------------------------------
def test_old_key_patch_files_still_apply_and_revert(cli, tiny, tmp_path):
    """A "memedit-row-patch" file (`keys adapt` of memedit 0.1) applies, is logged under the id 0.1 gave it, and
    reverts by that id or by its file, byte for byte."""
    from memedit.lm.hooks import keys_name
    from memedit.storage.checkpoint import fingerprint

    from .legacy_patches import key_patch_id, write_key_patch

    model, path = tiny
    k = model.memory_layers[2].keys.detach()
    changes = {keys_name(2): (torch.tensor([3, 8]), k[[3, 8]].clone(), k[[3, 8]] * 2)}
    old = write_key_patch(tmp_path / "old-keys.safetensors", changes, {"command": "keys adapt", "steps": "2"})
    before = folder_bytes(path)
    code, out, err = cli("keys", "apply", old, "--model", path)
    assert code == 0 and "applied 2 rows" in out, err
    assert torch.equal(load(path).memory_layers[2].keys[[3, 8]], k[[3, 8]] * 2)
    [entry] = json.loads(cli("patch", "log", "--model", path, "--json")[1])["entries"]
    assert entry["id"] == key_patch_id(changes) and entry["kind"] == "keys" and entry["rows"] == {keys_name(2): [3, 8]}
    code, out, _ = cli("patch", "show", old, "--json")
    assert code == 0 and json.loads(out)["id"] == key_patch_id(changes)
    assert cli("patch", "revert", key_patch_id(changes), "--model", path)[0] == 0
    assert fingerprint(load(path)) == fingerprint(model)
    assert cli("keys", "apply", old, "--model", path)[0] == 0
    code, out, err = cli("keys", "revert", old, "--model", path)
    assert code == 0 and "reverted 2 rows" in out, err
    assert fingerprint(load(path)) == fingerprint(model)
    after = folder_bytes(path)
    assert {n: b for n, b in after.items() if n.startswith(("config", "model", "tokenizer"))} == \
        {n: b for n, b in before.items() if n.startswith(("config", "model", "tokenizer"))}


def test_old_value_patch_files_still_apply_and_revert(cli, tiny, tmp_path):
    """A "memedit-patch" version 1 file (`patch set` of memedit 0.1) applies under its own id and reverts exactly;
    a damaged one is refused in one line with nothing changed."""
    from memedit.storage.checkpoint import fingerprint

    from .legacy_patches import write_value_patch

    model, path = tiny
    t = model.table("shared")
    rows = torch.tensor([2, 7])
    old_rows = t.weight.detach()[rows].clone()
    pid = write_value_patch(tmp_path / "old.safetensors", fingerprint(model), "shared", list(t.layers), rows,
                            old_rows, torch.full_like(old_rows, 0.5), message="two rows")
    code, out, err = cli("patch", "apply", tmp_path / "old.safetensors", "--model", path, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["id"] == pid and d["tables"][0]["table"] == "shared" and d["tables"][0]["layers"] == list(t.layers)
    assert torch.all(load(path).table("shared").weight[rows] == 0.5)
    assert json.loads(cli("patch", "log", "--model", path, "--json")[1])["applied"] == [pid]
    assert cli("patch", "revert", pid[:6], "--model", path)[0] == 0
    assert fingerprint(load(path)) == fingerprint(model)
    # damaged: a row's bytes no longer match the checksum the file stores
    raw = bytearray((tmp_path / "old.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    before = folder_bytes(path)
    code, _, err = cli("patch", "apply", tmp_path / "bad.safetensors", "--model", path)
    assert code == 2 and "damaged" in err and len(err.strip().splitlines()) == 1
    assert folder_bytes(path) == before


def test_new_patch_files_hold_value_and_key_rows_alike(tiny, tmp_path):
    """One format for both kinds of change: a patch of a value table and a layer's sub-keys saves, loads with its
    checksums checked, and round-trips every field."""
    from memedit.lm.hooks import keys_name
    from memedit.storage.patch import PATCH_FORMAT, Patch
    from memedit.storage.store import Change

    model, _ = tiny
    t, k = model.table("shared"), model.memory_layers[0].keys.detach()
    p = Patch([Change(t.state_names[0], "shared", torch.tensor([1]), t.weight.detach()[[1]].clone(),
                      torch.zeros(1, t.weight.shape[1]), list(t.layers)),
               Change(keys_name(0), keys_name(0), torch.tensor([4]), k[[4]].clone(), k[[4]] + 1, [0])],
              base="f" * 16, message="both", kind="keys", info={"why": "test"})
    q = Patch.load(p.save(tmp_path / "p.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == PATCH_FORMAT and f.metadata()["format_version"] == "2"
    assert (q.id, q.base, q.message, q.kind, q.info) == (p.id, p.base, "both", "keys", {"why": "test"})
    for a, b in zip(p.changes, q.changes, strict=True):
        assert (a.name, a.label, a.layers) == (b.name, b.label, b.layers)
        assert all(torch.equal(x, y) for x, y in ((a.rows, b.rows), (a.old, b.old), (a.new, b.new)))
    raw = bytearray((tmp_path / "p.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(MemeditError, match="does not match its rows; the file is damaged"):
        Patch.load(tmp_path / "bad.safetensors")
