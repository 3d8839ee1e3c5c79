"""Linked folders (`memedit convert DST --link`): a native folder whose base is a DCP step folder left where it is.

The source is written by two gloo ranks (tests/sharded_dcp.py); every test copies it first. A linked folder edits,
reverts exactly, survives a kill at each write point, refuses a moved or changed source in one line, never writes
the source, and re-hashes only the blocks a write touches."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

import memedit
from memedit.storage import linked, store
from memedit.storage.checkpoint import fingerprint
from memedit.storage.importers.dcp import DcpState

from .sharded_dcp import session_step
from .test_store import memedit_cmd, temp_files

TABLE = "layers.1.feed_forward.values.weight"


@pytest.fixture
def sharded_step(tmp_path_factory):
    """The two-rank step folder (tests/sharded_dcp.py), written once per session."""
    return session_step(tmp_path_factory)


@pytest.fixture(autouse=True)
def no_whole_table(monkeypatch):
    """Any operation that would copy the whole table fails here, as it must on a table larger than memory."""
    from memedit.storage import shards

    monkeypatch.setattr(shards, "MATERIALIZE_BYTES", 0)
    monkeypatch.setattr(shards, "READ_BYTES", 0)  # every range of rows read from the files, as on a big table


def tree_hashes(step):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(step.iterdir()) if p.is_file()}


@pytest.fixture
def linked_folder(sharded_step, tmp_path, cli):
    """(source copy, linked folder) made by the CLI."""
    src = shutil.copytree(sharded_step, tmp_path / "step")
    dst = tmp_path / "linked"
    code, out, err = cli("convert", dst, "--model", src, "--link")
    assert code == 0, err
    return src, dst


def source_rows(src, ids):
    return DcpState(src, mapped=False)[TABLE][ids]


def test_convert_link_copies_no_weights_and_edits_revert_exactly(linked_folder, cli):
    src, dst = linked_folder
    before = tree_hashes(src)
    files = {p.name: p.stat().st_size for p in dst.rglob("*") if p.is_file()}
    assert "model.safetensors" not in files and {"link.json", "link.blocks", "config.json"} <= set(files)
    assert sum(files.values()) < 64 << 10  # the source's tensors are 2.4 MB; the folder holds none of them
    link = json.loads((dst / "link.json").read_text())
    assert link["source"] == str(src.resolve()) and set(link["files"]) == {".metadata", "params.json",
                                                                         "__0_0.distcp", "__1_0.distcp"}
    model = memedit.load(dst)
    fp0 = fingerprint(model)
    ids = torch.tensor([5, 409, 4095])
    assert torch.equal(model.table("shared").weight[ids], source_rows(src, ids))

    assert cli("patch", "set", "-t", "shared", "-r", "5,409", "--scalar", "0.25", "--apply", "--model", dst)[0] == 0
    model = memedit.load(dst)
    assert bool(model.table("shared").weight[torch.tensor([5, 409])].eq(0.25).all())
    assert fingerprint(model) != fp0
    code, out, err = cli("check", "--model", dst, "--json")
    assert code == 0 and json.loads(out)["ok"], out
    entry = json.loads(cli("patch", "log", "--json", "--model", dst)[1])["entries"][0]
    assert cli("patch", "revert", entry["id"], "--model", dst)[0] == 0
    model = memedit.load(dst)
    assert torch.equal(model.table("shared").weight[ids], source_rows(src, ids)) and fingerprint(model) == fp0
    assert tree_hashes(src) == before  # the source, byte for byte


def test_background_and_an_edit_on_a_linked_folder_commit_and_revert(linked_folder, cli, tmp_path):
    src, dst = linked_folder
    fp0 = fingerprint(memedit.load(dst))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"The river {i} runs north of the old town and the market.\n" for i in range(40)))
    assert cli("background", corpus, "--model", dst)[0] == 0
    code, out, err = cli("edit", "--prompt", "The capital of {} is", "--subject", "France", "--target-new", " Rome",
                         "--target-true", " Paris", "--force", "--model", dst)
    assert code in (0, 1), err  # 1: the edit missed a metric; it is committed either way (--force)
    entries = json.loads(cli("patch", "log", "--json", "--model", dst)[1])["entries"]
    assert entries and entries[-1]["op"] == "apply"
    assert fingerprint(memedit.load(dst)) != fp0
    assert cli("patch", "revert", entries[-1]["id"], "--model", dst)[0] == 0
    assert fingerprint(memedit.load(dst)) == fp0
    assert cli("check", "--model", dst)[0] == 0


def test_a_moved_or_changed_source_is_refused_in_one_line(linked_folder, cli):
    src, dst = linked_folder
    moved = src.with_name("elsewhere")
    os.replace(src, moved)
    for args in (("generate", "hi", "-n", "1"), ("patch", "zero", "-t", "shared", "-r", "1", "--apply")):
        code, out, err = cli(*args, "--model", dst)
        assert code == 2 and "which is gone (moved or deleted)" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("check", "--model", dst, "--json")
    assert code == 1 and any("gone" in p for p in json.loads(out)["problems"])
    os.replace(moved, src)
    assert cli("generate", "hi", "-n", "1", "--model", dst)[0] == 0
    p = src / "params.json"
    p.write_text(p.read_text() + " ")
    code, out, err = cli("info", "--model", dst)
    assert code == 2 and "params.json changed since it was linked" in err and len(err.strip().splitlines()) == 1
    assert not (dst / "memedit" / "rows.log").exists()  # nothing written by the refused commands


def test_check_names_the_blocks_of_a_source_changed_behind_its_back(sharded_step, tmp_path, cli, monkeypatch):
    src = shutil.copytree(sharded_step, tmp_path / "step")
    monkeypatch.setattr(linked, "SMALL", 0)  # as for shards of many GB: identified by size and time only
    dst = tmp_path / "linked"
    assert cli("convert", dst, "--model", src, "--link")[0] == 0
    from memedit.storage.importers.safe import read_dcp_metadata
    from memedit.storage.shards import locate

    item = sorted(locate(src, read_dcp_metadata(src), "model." + TABLE), key=lambda i: i.offsets[0])[3]
    f = item.file
    st = f.stat()
    with open(f, "r+b") as fh:  # one byte of row 1,300 (in block 20), the time put back
        fh.seek(item.start + (1300 - item.offsets[0]) * 128)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, out, err = cli("check", "--model", dst, "--json")
    res = json.loads(out)
    assert code == 1 and any("differs from what was linked in 1 blocks of rows (e.g. rows 1,280..1,343)" in p
                             for p in res["problems"]), res


def test_a_write_rehashes_only_the_blocks_it_touches(linked_folder, monkeypatch):
    src, dst = linked_folder
    calls = []
    real = store.block_digest
    from memedit.storage import shards

    for mod in (store, shards):  # both hash blocks with blocks.block_digest, bound at import
        monkeypatch.setattr(mod, "block_digest", lambda *a: calls.append(a[1]) or real(*a))
    model = memedit.load(dst)
    fp0 = fingerprint(model)
    assert calls == []  # the digests kept in link.blocks: nothing hashed to load and fingerprint
    from memedit.editing.patch import apply, make_patch

    apply(model, make_patch(model, {"shared": ([70, 71], torch.ones(2, 64))}))
    assert set(calls) == {1} and len(calls) <= 8  # block 1 (rows 64..127), before and after
    calls.clear()
    w = model.table("shared").weight  # an edit's in-place write-and-restore
    old = w[torch.tensor([3000])].clone()
    with torch.no_grad():
        w[torch.tensor([3000])] = torch.zeros(1, 64, dtype=torch.bfloat16)
        w[torch.tensor([3000])] = old
    fp1 = fingerprint(model)
    assert 3000 // 64 in calls and set(calls) <= {1, 3000 // 64} and fp1 != fp0  # blocks written since, of 64
    assert fingerprint(memedit.load(dst)) == fp1


@pytest.mark.parametrize("args,point", [
    (("patch", "set", "-t", "shared", "-r", "3,4", "--scalar", "2", "--apply"), "patch-saved"),
    (("patch", "set", "-t", "shared", "-r", "3,4", "--scalar", "2", "--apply"), "log-torn"),
    (("patch", "set", "-t", "shared", "-r", "3,4", "--scalar", "2", "--apply"), "log-appended"),
    (("freeze", "-t", "shared", "-r", "3"), "replace-frozen.safetensors-tmp"),
    (("compact", "--native"), "compact-tmp"),
    (("compact", "--native"), "compact-renamed"),
], ids=["patch-saved", "log-torn", "log-appended", "freeze-tmp", "compact-tmp", "compact-renamed"])
def test_a_kill_at_every_write_point_leaves_a_consistent_linked_folder(linked_folder, args, point, cli):
    src, dst = linked_folder
    before = tree_hashes(src)
    if args[0] == "compact":
        assert cli("patch", "set", "-m", dst, "-t", "shared", "-r", "3", "--scalar", "2", "--apply")[0] == 0
    r = memedit_cmd(*args, "-m", dst, env={"MEMEDIT_CRASH_AT": point})  # killed like kill -9 at that point
    assert r.returncode == 137, r.stderr
    code, out, err = cli("check", "-m", dst, "--json")  # the next command recovers
    assert code == 0 and json.loads(out)["ok"], out + err
    assert not temp_files(dst)
    m = memedit.load(dst)
    applied = json.loads(cli("patch", "log", "-m", dst, "--json")[1])["entries"]
    changed = bool(m.table("shared").weight[3].eq(2).all())
    assert changed == bool(applied)  # a change is in the weights exactly when it is in the log
    assert tree_hashes(src) == before


def test_compact_writes_a_native_base_only_when_asked(linked_folder, cli):
    src, dst = linked_folder
    assert cli("patch", "set", "-t", "shared", "-r", "7", "--scalar", "1", "--apply", "--model", dst)[0] == 0
    fp = fingerprint(memedit.load(dst))
    code, out, err = cli("compact", "--model", dst)
    assert code == 2 and "compact --native" in err and len(err.strip().splitlines()) == 1
    assert not (dst / "model.safetensors").exists()
    assert cli("compact", "--native", "--model", dst)[0] == 0
    assert (dst / "model.safetensors").is_file() and not (dst / "link.json").exists()
    shutil.rmtree(src)  # the folder now stands alone
    model = memedit.load(dst)
    assert fingerprint(model) == fp and bool(model.table("shared").weight[7].eq(1).all())
    code, out, err = cli("check", "--model", dst, "--json")
    assert code == 0 and json.loads(out)["folded"] == 1, out


def test_link_needs_a_dcp_step_folder(tiny, tmp_path, cli):
    _, path = tiny
    code, out, err = cli("convert", tmp_path / "x", "--model", path, "--link")
    assert code == 2 and "--link links a DCP training step folder" in err and not (tmp_path / "x").exists()
