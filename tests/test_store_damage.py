"""Damaged model folders: a corruption matrix over every state file. `memedit check` never says ok on damage and
never raises; readers load the last consistent state only for a torn tail and otherwise refuse in one line; no
command cuts or deletes what it did not prove torn; `check --salvage` restores every record whose bytes or patch
file survive, keeps the damaged log aside, and lists what is lost."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memedit.lm.hooks import keys_name
from memedit.storage.checkpoint import fingerprint, load, save
from memedit.storage.state import background
from memedit.storage.store import LOG, LOG_MAGIC, MARK, REC_HEAD, Change, Store, encode_record, inspect_log, read_header

from .conftest import tiny_model
from .legacy_patches import write_key_patch
from .test_store import folder_hash, memedit_cmd

N_RECORDS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A converted tiny model with four records: apply A (value rows 1, 2), a key patch (sub-key 4 of layer 0),
    apply B (value row 3), revert A; plus frozen rows and background statistics. Returns (folder, spans of the
    records in rows.log, fingerprint after each record)."""
    from memedit_cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()

    def cli(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.stdout + r.stderr
        return r.stdout

    path = save(tiny_model(), tmp_path_factory.mktemp("damage") / "F")
    fps = [fingerprint(load(path))]
    cli("patch", "set", "-m", path, "-t", "shared", "-r", "1,2", "--scalar", "0.5", "--apply")
    fps.append(fingerprint(load(path)))
    k = load(path).memory_layers[0].keys.detach()
    (path / "memedit" / "patches").mkdir(exist_ok=True)  # a key patch as memedit 0.1 wrote it
    kp = write_key_patch(path / "memedit" / "patches" / "k.safetensors",
                         {keys_name(0): (torch.tensor([4]), k[[4]].clone(), k[[4]] + 1)})
    cli("keys", "apply", kp, "-m", path)
    fps.append(fingerprint(load(path)))
    cli("patch", "set", "-m", path, "-t", "shared", "-r", "3", "--scalar", "2", "--apply")
    fps.append(fingerprint(load(path)))
    first = json.loads(cli("patch", "log", "-m", path, "--json"))["applied"][0]
    cli("patch", "revert", first, "-m", path)
    fps.append(fingerprint(load(path)))
    cli("freeze", "-m", path, "-t", "shared", "-r", "9")
    m = load(path)
    n = m.table("shared").n_rows
    save_file({"df.shared": torch.ones(n), "counts.shared": torch.arange(n).float()},
              str(path / "memedit" / "background.safetensors"), metadata={"n_batches": "3", "tokens": "30"})
    spans = inspect_log(path / "memedit" / LOG).spans
    assert len(spans) == N_RECORDS
    return path, spans, fps


@pytest.fixture
def copy(folder, tmp_path):
    src, spans, fps = folder
    dst = tmp_path / "G"
    shutil.copytree(src, dst)
    return dst, spans, fps


def one_line_refusal(cli, *args) -> str:
    code, _, err = cli(*args)  # a traceback would raise here (the cli fixture re-raises)
    assert code == 2 and len(err.strip().splitlines()) == 1, (args, code, err)
    return err


def check_json(cli, path: Path, *flags) -> tuple[int, dict]:
    code, out, err = cli("check", "-m", path, "--json", *flags)
    assert code in (0, 1), err
    return code, json.loads(out)


# ---- rows.log -----------------------------------------------------------------------------------------------------
def flip(offset, mask=0x20):
    def damage(data: bytes, spans) -> bytes:
        b = bytearray(data)
        b[offset(spans)] ^= mask
        return bytes(b)
    return damage


def cut(offset):
    return lambda data, spans: data[: offset(spans)]


def json_at(i):  # a byte inside record i's JSON header (after the framing and the JSON length)
    return lambda s: s[i][0] + REC_HEAD.size + 4 + 20


def rows_at(i):  # a byte inside record i's rows (near its end)
    return lambda s: s[i][0] + s[i][1] - 9


# (name, damage, records after salvage, records lost, fingerprint index after salvage)
LOG_CASES = [
    ("flip file magic", flip(lambda s: 3), 4, 0, 4),
    ("flip format version", flip(lambda s: 15, 0x01), 4, 0, 4),  # to 0 (a higher one reads as a newer memedit)
    ("flip record marker, first", flip(lambda s: s[0][0] + 1), 4, 0, 4),
    ("flip length, middle", flip(lambda s: s[1][0] + 5), 4, 0, 4),
    ("flip checksum, middle", flip(lambda s: s[1][0] + 13), 4, 0, 4),
    ("flip checksum, last", flip(lambda s: s[3][0] + 12), 4, 0, 4),
    ("flip JSON header, first", flip(json_at(0)), 4, 0, 4),
    ("flip JSON header, middle", flip(json_at(2)), 4, 0, 4),
    ("flip JSON header, last", flip(json_at(3)), 4, 0, 4),
    ("flip rows, first", flip(rows_at(0)), 4, 0, 4),
    ("flip rows, middle", flip(rows_at(1)), 4, 0, 4),
    ("flip rows, last", flip(rows_at(3)), 4, 0, 4),
    # cut at a record boundary: the records' bytes are gone; applies come back from their unused patch files,
    # the final revert (whose patch file another record names) is lost
    ("cut to empty", cut(lambda s: 0), 3, 1, 3),
    ("cut after the file magic", cut(lambda s: len(LOG_MAGIC)), 3, 1, 3),
    ("cut after record 1", cut(lambda s: s[1][0]), 3, 1, 3),
    ("cut after record 2", cut(lambda s: s[2][0]), 3, 1, 3),
    ("cut after record 3", cut(lambda s: s[3][0]), 3, 1, 3),
    # cut inside a committed record: not a torn append (rows.end says it was written)
    ("cut in record 2's framing", cut(lambda s: s[1][0] + 7), 3, 1, 3),
    ("cut in record 3's JSON", cut(json_at(2)), 3, 1, 3),
    ("cut in record 3's rows", cut(rows_at(2)), 3, 1, 3),
    ("cut in the last record's rows", cut(rows_at(3)), 4, 0, 4),
    ("cut the last byte", cut(lambda s: s[3][0] + s[3][1] - 1), 4, 0, 4),
]


# damage that leaves a record's framing and JSON header whole: salvage rebuilds the very bytes that were written
EXACT = {"flip file magic", "flip format version", "flip rows, first", "flip rows, middle", "flip rows, last",
         "cut in the last record's rows", "cut the last byte"}


@pytest.mark.parametrize("name,damage,n_after,n_lost,fp_after", LOG_CASES, ids=[c[0] for c in LOG_CASES])
def test_a_damaged_row_log_is_refused_reported_and_salvaged(cli, folder, copy, name, damage, n_after, n_lost,
                                                            fp_after):
    path, spans, fps = copy
    log = path / "memedit" / LOG
    damaged = damage(log.read_bytes(), spans)
    log.write_bytes(damaged)
    before = folder_hash(path)
    # readers and writers refuse in one line, naming the log; nothing changes
    assert LOG in one_line_refusal(cli, "generate", "the cat", "-n", "1", "-m", path)
    assert "memedit check" in one_line_refusal(cli, "patch", "zero", "-m", path, "-t", "shared", "-r", "5", "--apply")
    one_line_refusal(cli, "patch", "log", "-m", path)
    # check reports it and cuts nothing
    code, res = check_json(cli, path)
    assert code == 1 and not res["ok"] and any(LOG in p for p in res["problems"]), res
    assert folder_hash(path) == before
    # salvage: the damaged log is kept aside, every record whose bytes or patch file survive comes back
    code, res = check_json(cli, path, "--salvage")
    assert len(res["lost"]) == n_lost and code == (1 if n_lost else 0), res
    [aside] = path.joinpath("memedit").glob(f"{LOG}.damaged-*")
    assert aside.read_bytes() == damaged
    assert len(Store(path).records()) == n_after
    assert fingerprint(load(path)) == fps[fp_after]
    if name in EXACT:
        assert log.read_bytes() == (folder[0] / "memedit" / LOG).read_bytes()
        rebuilt = any("restored byte for byte" in r for r in res["repaired"])
        assert rebuilt or name.startswith(("flip file", "flip format")), res
    code, res = check_json(cli, path)
    assert code == 0 and res["fingerprint"] == fps[fp_after], res
    assert cli("patch", "zero", "-m", path, "-t", "shared", "-r", "5", "--apply")[0] == 0  # writable again


TORN = [("half a record", lambda rec: rec[: len(rec) // 2]), ("part of its framing", lambda rec: rec[:7]),
        ("all but its last byte", lambda rec: rec[:-1])]


@pytest.mark.parametrize("name,tear", TORN, ids=[t[0] for t in TORN])
def test_a_torn_last_record_is_ignored_by_readers_and_cut_by_the_next_writer(cli, copy, name, tear):
    path, spans, fps = copy
    log = path / "memedit" / LOG
    good = log.read_bytes()
    rec = good[spans[2][0]: spans[2][0] + spans[2][1]]
    log.write_bytes(good + tear(rec))  # an append killed part-way: rows.end was not updated
    assert fingerprint(load(path)) == fps[4]  # readers: the last consistent state
    code, res = check_json(cli, path)
    assert code == 0 and res["ok"], res
    cut = len(tear(rec))
    assert res["repaired"] == [f"cut a torn last record ({cut:,} bytes) off {LOG}"]
    assert log.read_bytes() == good


def test_a_checksum_valid_record_with_nan_rows_is_damage(cli, copy):
    path, _, fps = copy
    t = load(path).table("shared")
    nan = Change(t.state_names[0], "shared", torch.tensor([6]), t.weight.detach()[[6]].clone(),
                 torch.full((1, t.weight.shape[1]), float("nan"), dtype=t.weight.dtype))
    with open(path / "memedit" / LOG, "ab") as f:  # crafted: no memedit writes NaN rows
        f.write(encode_record({"op": "apply", "id": "crafted", "file": "patches/none.safetensors"}, [nan]))
    err = one_line_refusal(cli, "generate", "the cat", "-n", "1", "-m", path)
    assert "record 5" in err and "NaN" in err
    code, res = check_json(cli, path, "--salvage")
    assert code == 1 and len(res["lost"]) == 1 and "none.safetensors is gone" in res["lost"][0], res
    assert fingerprint(load(path)) == fps[4] and len(Store(path).records()) == 4


def test_salvage_never_overwrites_a_log_it_kept_aside(cli, copy):
    path, spans, fps = copy
    log = path / "memedit" / LOG
    kept = []
    for offset in (rows_at(0), rows_at(2)):  # damaged twice, salvaged twice within a second
        kept.append(flip(offset)(log.read_bytes(), spans))
        log.write_bytes(kept[-1])
        assert check_json(cli, path, "--salvage")[0] == 0
    assert sorted(p.read_bytes() for p in path.joinpath("memedit").glob(f"{LOG}.damaged-*")) == sorted(kept)
    assert fingerprint(load(path)) == fps[4]


def test_salvage_rebuilds_a_damaged_record_the_base_already_holds(cli, copy):
    path, spans, fps = copy
    assert cli("compact", "-m", path)[0] == 0
    log = path / "memedit" / LOG
    log.write_bytes(flip(rows_at(1))(log.read_bytes(), spans))
    assert check_json(cli, path)[0] == 1
    code, res = check_json(cli, path, "--salvage")
    assert code == 0 and not res["lost"], res
    assert fingerprint(load(path)) == fps[4] and res["folded"] == 4


@pytest.mark.parametrize("mark", ["[1, 2", json.dumps({"records": 4, "bytes": 10, "sha": "0" * 64})],
                         ids=["garbage", "another last record"])
def test_a_damaged_marker_is_reported_and_rebuilt(cli, copy, mark):
    path, _, fps = copy
    (path / "memedit" / MARK).write_text(mark)
    one_line_refusal(cli, "generate", "the cat", "-n", "1", "-m", path)
    assert check_json(cli, path)[0] == 1
    code, res = check_json(cli, path, "--salvage")
    assert code == 0 and any(MARK in r for r in res["repaired"]) and not res["lost"], res
    assert fingerprint(load(path)) == fps[4] and len(Store(path).records()) == 4


# ---- the other state files --------------------------------------------------------------------------------------
def _st(path, rel, tensors, meta=None):
    p = path / rel
    if p.is_dir():
        shutil.rmtree(p)
    save_file(tensors, str(p), metadata=meta)


def _truncate(rel, keep=0.5):
    def damage(path):
        p = path / rel
        p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])
    return damage


def _flip_base_header(path):
    p = path / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[8 + 2] ^= 0x01  # inside the JSON header: a tensor name's quote
    p.write_bytes(b)


def _flip_base_data(tensor, value=None):
    def damage(path):
        p = path / "model.safetensors"
        info = read_header(p)[0]
        t = next(v for k, v in info.items() if k == tensor or k.endswith(tensor))
        b = bytearray(p.read_bytes())
        if value is None:
            for i in range(t.start + 64, t.start + 128):
                b[i] ^= 0xFF
        else:  # NaN in the first row
            b[t.start: t.start + len(value)] = value
        p.write_bytes(b)
    return damage


def _config(change):
    def damage(path):
        p = path / "config.json"
        cfg = json.loads(p.read_text())
        p.write_text(json.dumps(change(cfg)))
    return damage


def _set(d, keys, v):
    x = d
    for k in keys[:-1]:
        x = x[k]
    x[keys[-1]] = v
    return d


def _tokenizer_dir(path):
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.json").mkdir()


def _bigger_vocab(path):
    p = path / "tokenizer.json"
    tok = json.loads(p.read_text())
    tok["vocab"] = tok["vocab"] + [f"w{i}" for i in range(500)]
    p.write_text(json.dumps(tok))


FROZEN = "memedit/frozen.safetensors"
BACKGROUND = "memedit/background.safetensors"
NAN_F32 = struct.pack("<f", float("nan")) * 4
# (name, damage, what a reader runs: "generate", "freeze" (frozen rows), "background"; None: readers cannot see it)
FILE_CASES = [
    ("model.safetensors truncated", _truncate("model.safetensors"), "generate"),
    ("model.safetensors header flipped", _flip_base_header, "generate"),
    ("model.safetensors header length flipped", lambda p: _flip_at(p / "model.safetensors", 5), "generate"),
    ("model.safetensors data flipped (output.weight)", _flip_base_data("output.weight"), None),
    ("model.safetensors NaN in norm.weight", _flip_base_data("norm.weight", NAN_F32), None),
    ("model.safetensors NaN in a value row", _flip_base_data("values.weight", NAN_F32), None),
    ("rows.log a folder", lambda p: (p / "memedit" / LOG).unlink() or (p / "memedit" / LOG).mkdir(), "generate"),
    ("memedit/ a file", lambda p: shutil.rmtree(p / "memedit") or (p / "memedit").write_text("x"), "generate"),
    ("frozen truncated", _truncate(FROZEN), "freeze"),
    ("frozen a folder", lambda p: (p / FROZEN).unlink() or (p / FROZEN).mkdir(), "freeze"),
    ("frozen wrong type (2-d floats)", lambda p: _st(p, FROZEN, {"shared": torch.zeros(2, 2)}), "freeze"),
    ("frozen wrong rank (2-d ids)", lambda p: _st(p, FROZEN, {"shared": torch.zeros(2, 2, dtype=torch.long)}),
     "freeze"),
    ("frozen NaN", lambda p: _st(p, FROZEN, {"shared": torch.tensor([float("nan")])}), "freeze"),
    ("frozen out of range (70,000)", lambda p: _st(p, FROZEN, {"shared": torch.tensor([70_000])}), "freeze"),
    ("frozen out of range (-3)", lambda p: _st(p, FROZEN, {"shared": torch.tensor([-3])}), "freeze"),
    ("frozen unknown table", lambda p: _st(p, FROZEN, {"layer7": torch.tensor([1])}), "freeze"),
    ("frozen sub-keys out of range", lambda p: _st(p, FROZEN, {"keys.layer0": torch.tensor([10**6])}), "freeze"),
    ("background truncated", _truncate(BACKGROUND), "background"),
    ("background wrong type (2-d)", lambda p: _st(p, BACKGROUND, {"df.shared": torch.ones(2, 2)}), "background"),
    ("background out of range (length)", lambda p: _st(p, BACKGROUND, {"df.shared": torch.ones(3)}), "background"),
    ("background out of range (negative)",
     lambda p: _st(p, BACKGROUND, {"df.shared": -torch.ones(256)}), "background"),
    ("background NaN", lambda p: _st(p, BACKGROUND, {"df.shared": torch.full((256,), float("nan"))}), "background"),
    ("background bad metadata", lambda p: _st(p, BACKGROUND, {"df.shared": torch.ones(256)}, {"n_batches": "x"}),
     "background"),
    ("config.json truncated", _truncate("config.json"), "generate"),
    ("config.json a JSON list", lambda p: (p / "config.json").write_text("[1, 2]"), "generate"),
    ("config.json model a list", _config(lambda c: _set(c, ["model"], [1])), "generate"),
    ("config.json out of range (dim -3)", _config(lambda c: _set(c, ["model", "dim"], -3)), "generate"),
    ("config.json rope_theta NaN", _config(lambda c: _set(c, ["model", "rope_theta"], float("nan"))), "generate"),
    ("config.json norm_eps -1", _config(lambda c: _set(c, ["model", "norm_eps"], -1.0)), "generate"),
    ("config.json dtype a list", _config(lambda c: _set(c, ["dtype"], [1])), "generate"),
    ("tokenizer.json truncated", _truncate("tokenizer.json"), "generate"),
    ("tokenizer.json missing", lambda p: (p / "tokenizer.json").unlink(), None),
    ("tokenizer.json a folder", _tokenizer_dir, "generate"),
    ("tokenizer.json a JSON list", lambda p: (p / "tokenizer.json").write_text("[]"), "generate"),
    ("tokenizer.json out of range (vocab too big)", _bigger_vocab, "generate"),
    ("base fingerprint metadata garbage", lambda p: _base_meta(p, {"memedit.fp": "[1, 2]"}), None),
    ("base fingerprint metadata wrong", lambda p: _base_meta(p, {"memedit.fp": json.dumps({"x": "ff"})}), None),
    ("base folded count garbage", lambda p: _base_meta(p, {"memedit.folded": "-4"}), "generate"),
]


def _flip_at(p: Path, offset: int):
    b = bytearray(p.read_bytes())
    b[offset] ^= 0x40
    p.write_bytes(b)


def _base_meta(path: Path, change: dict):
    from safetensors import safe_open

    p = path / "model.safetensors"
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(p), metadata=meta | change)


@pytest.mark.parametrize("name,damage,reader", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_a_damaged_state_file_is_reported_and_refused(cli, copy, name, damage, reader):
    path, _, _ = copy
    damage(path)
    before = folder_hash(path)
    code, res = check_json(cli, path)
    assert code == 1 and not res["ok"] and res["problems"], res
    code, _, _ = cli("check", "-m", path, "--salvage")  # nothing to salvage in the log: still not ok, no traceback
    assert code == 1
    if reader == "generate":
        one_line_refusal(cli, "generate", "the cat", "-n", "1", "-m", path)
    elif reader == "freeze":
        for args in (("freeze", "-t", "shared", "-r", "6"), ("patch", "set", "-t", "shared", "-r", "6", "--scalar",
                                                             "1", "--apply")):
            err = one_line_refusal(cli, *args, "-m", path)
            assert "frozen.safetensors" in err and "memedit check" in err
    elif reader == "background":
        from memedit.errors import MemeditError

        with pytest.raises(MemeditError, match="background.safetensors is damaged.*memedit check"):
            background(load(path))
    assert folder_hash(path) == before


def test_check_lists_every_problem_at_once(cli, copy):
    path, spans, _ = copy
    log = path / "memedit" / LOG
    log.write_bytes(flip(rows_at(1))(log.read_bytes(), spans))
    _st(path, FROZEN, {"shared": torch.tensor([70_000])})
    _st(path, BACKGROUND, {"df.shared": torch.full((256,), float("nan"))})
    _flip_base_data("output.weight")(path)
    (path / "tokenizer.json").unlink()
    code, res = check_json(cli, path)
    found = " | ".join(res["problems"])
    assert code == 1 and res["fingerprint"] is None
    for what in (f"{LOG} is damaged: record 2", "frozen.safetensors", "background.safetensors", "fingerprint sums",
                 "tokenizer"):
        assert what in found, (what, res["problems"])


# ---- repairs, outputs, the lock -----------------------------------------------------------------------------------
def test_check_removes_stale_temp_files_and_says_what_it_cut(cli, copy):
    path, spans, _ = copy
    log = path / "memedit" / LOG
    good = log.read_bytes()
    log.write_bytes(good + good[spans[1][0]: spans[1][0] + 100])  # a torn append
    (path / ".tmpAb12Cd").write_bytes(b"x" * 1000)  # safetensors' save_file temp, left by a killed compact
    (path / "memedit" / "patches" / ".tmpZZ99aa").write_bytes(b"x")
    (path / "memedit" / ".frozen.safetensors.k2j3.tmp").write_bytes(b"x")
    (path / ".tmp-notours").write_bytes(b"x")  # not a temp name memedit or safetensors makes: left alone
    code, res = check_json(cli, path)
    assert code == 0, res
    assert sorted(res["repaired"]) == sorted([
        f"cut a torn last record (100 bytes) off {LOG}", "removed the temp file .tmpAb12Cd",
        "removed the temp file memedit/patches/.tmpZZ99aa",
        "removed the temp file memedit/.frozen.safetensors.k2j3.tmp"])
    assert (path / ".tmp-notours").exists() and log.read_bytes() == good


def test_check_refuses_a_folder_of_another_layout_in_one_line(cli, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    assert "not a native memedit folder" in one_line_refusal(cli, "check", "-m", d)


def test_the_next_writer_removes_safetensors_temp_files(cli, copy):
    path, _, _ = copy
    (path / ".tmpQw12Er").write_bytes(b"x")
    assert cli("patch", "zero", "-m", path, "-t", "shared", "-r", "5", "--apply")[0] == 0
    assert not (path / ".tmpQw12Er").exists()


def test_an_output_must_be_a_regular_file_or_a_new_path(cli, copy, tmp_path):
    path, _, _ = copy
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for out in ("/dev/null", str(fifo)):
        err = one_line_refusal(cli, "patch", "set", "-m", path, "-t", "shared", "-r", "5", "--scalar", "1",
                               "--out", out)
        assert "not a regular file" in err
    assert Path("/dev/null").is_char_device() and fifo.is_fifo()
    new = tmp_path / "p.safetensors"
    assert cli("patch", "set", "-m", path, "-t", "shared", "-r", "5", "--scalar", "1", "--out", new)[0] == 0
    assert new.is_file()


def test_a_refused_writer_leaves_the_holders_text(copy):
    path, _, _ = copy
    lock = path / "memedit" / "lock"
    with Store(path).locked():
        held = lock.read_text()
        r = memedit_cmd("--no-wait", "freeze", "-m", path, "-t", "shared", "-r", "5")
        assert r.returncode == 2 and held.startswith("pid ") and held in r.stderr
        assert lock.read_text() == held


def test_salvage_rebuilds_records_from_the_patch_files_of_memedit_0_1(cli, tmp_path):
    """A folder written by memedit 0.1: its log's records name patch files in the two old formats. Damage each
    record's rows: salvage rebuilds it byte for byte from its old-format file, and both patches then revert by the
    ids 0.1 logged."""
    from memedit.lm.hooks import keys_name
    from memedit.storage.store import commit

    from .legacy_patches import key_patch_id, write_value_patch

    path = save(tiny_model(), tmp_path / "F")
    m = load(path)
    fp0 = fingerprint(m)
    patches = path / "memedit" / "patches"
    patches.mkdir(parents=True)
    t, rows = m.table("shared"), torch.tensor([1, 2])
    old = t.weight.detach()[rows].clone()
    pid = write_value_patch(patches / "v.safetensors", fp0, "shared", list(t.layers), rows, old, old + 1)
    (patches / "v.safetensors").rename(patches / f"{pid}.safetensors")
    k_old = m.memory_layers[0].keys.detach()[[4]].clone()
    kc = {keys_name(0): (torch.tensor([4]), k_old, k_old + 1)}
    kfile = write_key_patch(patches / "keys-adapt-20260101-120000.safetensors", kc, {"command": "keys adapt"})
    # the records memedit 0.1 appended for them (editing/patch.py's _commit, keyspace/keys.py's _commit_key_patch)
    commit(m, [Change(t.state_names[0], "shared", rows, old, old + 1)],
           {"op": "apply", "id": pid, "file": f"patches/{pid}.safetensors", "kind": "set", "message": "",
            "forced": False})
    commit(m, [Change(keys_name(0), keys_name(0), torch.tensor([4]), k_old, k_old + 1)],
           {"op": "apply", "id": key_patch_id(kc), "file": f"patches/{kfile.name}", "kind": "keys",
            "message": "keys adapt (1 rows)", "forced": False})
    log = path / "memedit" / LOG
    good, fp2 = log.read_bytes(), fingerprint(load(path))
    spans = inspect_log(log).spans
    for i in range(2):
        log.write_bytes(flip(rows_at(i))(good, spans))
        code, res = check_json(cli, path, "--salvage")
        assert code == 0 and any("restored byte for byte" in r for r in res["repaired"]), res
        assert log.read_bytes() == good and fingerprint(load(path)) == fp2
        for aside in path.joinpath("memedit").glob(f"{LOG}.damaged-*"):
            aside.unlink()
    assert cli("patch", "revert", pid, "-m", path)[0] == 0
    assert cli("keys", "revert", kfile, "-m", path)[0] == 0
    assert fingerprint(load(path)) == fp0
