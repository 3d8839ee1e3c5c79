"""The model store: row-level writes, the row log as edit log, the writers' lock, crash recovery, frozen rows on
every write path, and bad input that never costs data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memedit.editing.patch import make_patch
from memedit.lm.hooks import keys_name
from memedit.storage.check import check_folder
from memedit.storage.checkpoint import fingerprint, load, save
from memedit.storage.state import write_frozen_rows
from memedit.storage.store import LOG, Store, compact

from .conftest import tiny_model
from .legacy_patches import write_key_patch


def folder_hash(path: Path) -> dict[str, str]:
    """sha256 of every file of a model folder except the (empty when idle) lock file."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "lock"}


def temp_files(path: Path) -> list[str]:
    return [str(p) for p in path.rglob(".*.tmp")]


def memedit_cmd(*args, env=None) -> subprocess.CompletedProcess:
    """Run the CLI as a separate process (for kills and concurrent writers)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "memedit_cli", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=120)


def test_a_patch_appends_its_rows_and_never_rewrites_the_base(cli, tiny):
    model, path = tiny
    base = (path / "model.safetensors").read_bytes()
    code, out, _ = cli("patch", "set", "-m", path, "-t", "shared", "-r", "5,9", "--scalar", "0.5", "--apply", "--json")
    assert code == 0
    assert (path / "model.safetensors").read_bytes() == base  # the base is immutable
    log_size = (path / "memedit" / LOG).stat().st_size
    assert log_size < 4096  # 2 rows old + new of width 32, plus the record header
    back = load(path)
    assert back.table("shared").weight[[5, 9]].eq(0.5).all()
    expected = tiny_model()
    with torch.no_grad():
        expected.table("shared").weight[[5, 9]] = 0.5
    assert fingerprint(back) == fingerprint(expected)  # the kept fingerprint equals a full re-hash
    # the edit log is read from the same record
    [entry] = json.loads(cli("patch", "log", "-m", path, "--json")[1])["entries"]
    assert entry["rows"] == {"shared": [5, 9]} and entry["after"] == fingerprint(back)
    # compact folds it into a new base; the history and revert stay
    res = compact(back)
    assert res["records"] == 1 and (path / "model.safetensors").read_bytes() != base
    again = load(path)
    assert fingerprint(again) == fingerprint(back)
    code, _, _ = cli("patch", "revert", entry["id"], "-m", path)
    assert code == 0 and fingerprint(load(path)) == fingerprint(tiny_model())


def test_loading_maps_the_base_instead_of_copying_it(tiny):
    _, path = tiny
    m = load(path)
    w = m.table("shared").weight
    # a mapped tensor: its storage is the file's size, not the tensor's
    assert w.untyped_storage().nbytes() == (path / "model.safetensors").stat().st_size
    with torch.no_grad():
        w[0] = 7.0  # copy-on-write: the file is untouched
    assert not load(path).table("shared").weight[0].eq(7.0).all()


def test_concurrent_writers_lose_nothing(tiny):
    _, path = tiny
    procs = [subprocess.Popen([sys.executable, "-m", "memedit_cli", "patch", "set", "-m", str(path), "-t", "shared",
                               "-r", str(10 + i), "--scalar", str(i + 1), "--apply"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for i in range(4)]
    for p in procs:
        p.wait(timeout=120)
        assert p.returncode == 0, p.stderr.read().decode()
    m = load(path)
    for i in range(4):
        assert m.table("shared").weight[10 + i].eq(i + 1).all()
    log = [e for e in Store(path).records(with_rows=False)]
    assert len(log) == 4
    assert check_folder(path)["ok"]


def test_no_wait_names_the_holder(cli, tiny):
    _, path = tiny
    with Store(path).locked():
        r = memedit_cmd("--no-wait", "patch", "zero", "-m", path, "-t", "shared", "-r", "1", "--apply")
    assert r.returncode == 2 and "is being changed by pid" in r.stderr and len(r.stderr.strip().splitlines()) == 1


CRASHES = [
    (("patch", "set", "-t", "shared", "-r", "3,4", "--scalar", "2", "--apply"), "patch-saved"),
    (("patch", "set", "-t", "shared", "-r", "3,4", "--scalar", "2", "--apply"), "log-torn"),
    (("patch", "set", "-t", "shared", "-r", "3,4", "--scalar", "2", "--apply"), "log-appended"),
    (("freeze", "-t", "shared", "-r", "3"), "replace-frozen.safetensors-tmp"),
    (("freeze", "-t", "shared", "-r", "3"), "replace-frozen.safetensors-renamed"),
    (("compact",), "compact-tmp"),
    (("compact",), "compact-renamed"),
]


@pytest.mark.parametrize("args,point", CRASHES, ids=[p for _, p in CRASHES])
def test_a_kill_at_every_write_point_leaves_a_consistent_folder(tiny, args, point):
    _, path = tiny
    if args[0] == "compact":  # something to fold
        assert memedit_cmd("patch", "zero", "-m", path, "-t", "shared", "-r", "7", "--apply").returncode == 0
    r = memedit_cmd(*args, "-m", path, env={"MEMEDIT_CRASH_AT": point})
    assert r.returncode == 137, r.stderr
    # the next command (any writer, here `check`) recovers; the weights agree with the log
    r = memedit_cmd("check", "-m", path, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["ok"] and not temp_files(path)
    m = load(path)
    applied = {e["id"] for e in json.loads(memedit_cmd("patch", "log", "-m", path, "--json").stdout)["entries"]}
    changed = bool(m.table("shared").weight[3].eq(2).all())
    if args[:2] == ("patch", "set"):
        assert changed == bool(applied)  # a change is in the weights exactly when it is in the log
        if not changed:  # and the command simply works again
            assert memedit_cmd(*args, "-m", path).returncode == 0


def test_frozen_rows_and_subkeys_refuse_every_write_path(cli, tiny, tmp_path):
    model, path = tiny
    # patches made before the freeze, applied after
    value_patch = make_patch(model, {"shared": ([1, 2], torch.ones(2, 32))}).save(tmp_path / "v.safetensors")
    k = model.memory_layers[0].keys.detach()
    key_patch = write_key_patch(tmp_path / "k.safetensors",
                                {keys_name(0): (torch.tensor([4]), k[[4]].clone(), k[[4]] + 1)})
    norm = model.norm.weight.detach()
    out_patch = write_key_patch(tmp_path / "o.safetensors", {"output.weight": (
        torch.tensor([0]), model.output.weight.detach()[[0]].clone(), torch.zeros(1, 32))})
    nan_patch = write_key_patch(tmp_path / "n.safetensors", {"norm.weight": (
        torch.tensor([0]), norm[[0]].clone(), torch.tensor([float("nan")]))})
    nan_key = write_key_patch(tmp_path / "i.safetensors", {keys_name(2): (
        torch.tensor([0]), model.memory_layers[2].keys.detach()[[0]].clone(), torch.full((1, 8), float("inf")))})
    # an applied patch whose rows get frozen later cannot be reverted
    assert cli("patch", "zero", "-m", path, "-t", "shared", "-r", "6", "--apply")[0] == 0
    applied = json.loads(cli("patch", "log", "-m", path, "--json")[1])["applied"][0]
    write_frozen_rows(load(path), {"shared": torch.tensor([1, 6]), "keys.layer0": torch.tensor([4])})
    before = folder_hash(path)
    attempts = [
        ("patch", "set", "-t", "shared", "-r", "1", "--scalar", "3", "--apply"),
        ("patch", "zero", "-t", "shared", "-r", "0-2", "--apply"),
        ("patch", "copy", "-t", "shared", "-r", "6", "--from-row", "0", "--apply"),
        ("patch", "apply", value_patch),
        ("patch", "apply", value_patch, "--force"),
        ("patch", "revert", applied),
        ("patch", "revert", applied, "--force"),
        ("keys", "apply", key_patch),
        ("keys", "revert", key_patch),
        ("keys", "apply", out_patch),
        ("keys", "apply", nan_patch),
        ("keys", "apply", nan_key),
        ("patch", "revert", "nonexistent"),
    ]
    for a in attempts:
        code, _, err = cli(*a, "-m", path)
        assert code == 2 and len(err.strip().splitlines()) == 1, (a, err)
        assert folder_hash(path) == before, a


def _bad_inputs(path: Path, tmp: Path) -> list[tuple]:
    """(args...) that must each end in one line, exit 2, nothing changed."""
    m = str(path)
    junk = tmp / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    huge = tmp / "huge.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    txt = tmp / "rows.txt"
    txt.write_text("not rows")
    out = []
    for op in ("set", "add", "scale", "zero", "copy"):
        extra = {"set": ["--scalar", "1"], "add": ["--scalar", "1"], "scale": ["--scalar", "2"], "zero": [],
                 "copy": ["--from-row", "0"]}[op]
        for bad in (["-t", "nope", "-r", "1"], ["-t", "shared", "-r", "999999"],
                    ["-t", "shared", "-r", "0-10000000000"],
                    ["-t", "shared", "-r", "abc"], ["-t", "shared", "-r", "5-3"], ["-t", "shared", "-r", "-1"],
                    ["-t", "shared", "-r", "1", "--out", f"{m}/model.safetensors"],
                    ["-t", "shared", "-r", "1", "--out", f"{m}/config.json"],
                    ["-t", "shared", "-r", "1", "--out", f"{m}/memedit/rows.log"],
                    ["-t", "shared", "-r", "1", "--out", m],
                    ["-t", "shared", "-r", "2"], ["-t", "shared", "-r", "1", "-m", "/no/such/model"]):
            out.append(("patch", op, *bad, *extra, "--apply"))
    for s in ("nan", "inf", "-inf"):
        out.append(("patch", "set", "-t", "shared", "-r", "1", "--scalar", s, "--apply"))
        out.append(("patch", "scale", "-t", "shared", "-r", "1", "--scalar", s, "--apply"))
    for f in (junk, huge, tmp / "missing.safetensors", txt):
        out += [("patch", "apply", f), ("patch", "show", f), ("keys", "apply", f), ("keys", "revert", f),
                ("patch", "revert", f)]
    out += [("patch", "set", "-t", "shared", "-r", "1", "--values", f) for f in (junk, txt, tmp / "none.npy")]
    out += [("freeze", "-t", "shared", "-r", r) for r in ("999999", "0-10000000000", "x", "-4")]
    out += [("unfreeze", "-t", "nope", "-r", "1"), ("freeze", "-t", "shared", "--file", str(txt))]
    out += [("export", "--out", f"{m}/model.safetensors"), ("export", "--out", f"{m}/tokenizer.json"),
            ("audit", str(txt), "--out", f"{m}/model.safetensors"),
            ("edit", "--prompt", "{} was born in", "--subject", "the", "--target-new", "park", "--out",
             f"{m}/model.safetensors", "--forgetting-sample", "0", "--ranking", "counts"),
            ("compact", "-m", str(tmp / "nowhere")), ("check", "-m", str(tmp / "nowhere")),
            ("check", "-m", str(junk)), ("patch", "log", "-m", str(tmp / "nowhere")),
            ("patch", "revert", "abc"), ("patch", "revert", ""), ("keys", "revert", str(tmp)),
            ("generate", "the cat " * 5000), ("generate", "the cat", "-n", str(10**9))]
    return [a if "-m" in a or a[:2] == ("patch", "show") else (*a, "-m", m) for a in out]


def test_bad_inputs_cost_no_data_and_print_one_line(cli, tiny, tmp_path):
    _, path = tiny
    write_frozen_rows(load(path), {"shared": torch.tensor([2])})
    cases = _bad_inputs(path, tmp_path)
    assert len(cases) >= 100
    before = folder_hash(path)
    for args in cases:
        code, _, err = cli(*args)  # a traceback would raise here (the cli fixture re-raises)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
        assert folder_hash(path) == before, args
        assert not temp_files(path)


@pytest.mark.parametrize("change,message", [
    ({"vocab_size": 10**9}, "the config implies"),
    ({"vocab_size": 10**12}, "out of range"),
    ({"memory": {"layers": [0], "n_keys": 10**6, "heads": 1, "knn": 4, "k_dim": 16}}, "TiB"),
    ({"dim": -3}, "out of range"),
    ({"tokenizer": "../other/tokenizer.json"}, "leaves the model folder"),
    ({"tokenizer": "/etc/passwd"}, "leaves the model folder"),
])
def test_bad_configs_are_one_line(cli, tmp_path, change, message):
    path = save(tiny_model(), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    for k, v in change.items():
        if k == "tokenizer":
            cfg[k] = v
        elif k == "memory":
            cfg["model"]["memory"].update(v)
        else:
            cfg["model"][k] = v
    (path / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("info", "-m", path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_folder_from_an_earlier_version_opens_and_upgrades(cli, tiny):
    _, path = tiny
    d = path / "memedit"
    d.mkdir(exist_ok=True)
    (d / "edits.jsonl").write_text(json.dumps({"op": "apply", "id": "abc123", "file": "patches/x", "kind": "set"})
                                   + "\n")
    assert json.loads(cli("patch", "log", "-m", path, "--json")[1])["applied"] == ["abc123"]
    code, _, err = cli("patch", "zero", "-m", path, "-t", "shared", "-r", "1", "--apply")
    assert code == 2 and "memedit check --upgrade" in err
    code, out, _ = cli("check", "--upgrade", "-m", path)
    assert code == 0 and not (d / "edits.jsonl").exists()
    assert json.loads(cli("patch", "log", "-m", path, "--json")[1])["applied"] == ["abc123"]
    assert cli("patch", "zero", "-m", path, "-t", "shared", "-r", "1", "--apply")[0] == 0
    (d / "edits.jsonl").write_text('{"op": "apply"}\n')  # a line without an id, in a (re-)legacy folder
    (d / LOG).unlink()
    (d / "rows.end").unlink()  # a folder of that version has no row log, nor its marker
    code, _, err = cli("patch", "log", "-m", path)
    assert code == 2 and "needs an op and an id" in err


def test_files_keep_the_users_umask(cli, tiny):
    _, path = tiny
    old = os.umask(0o022)
    try:
        assert cli("patch", "zero", "-m", path, "-t", "shared", "-r", "1", "--apply")[0] == 0
        assert cli("freeze", "-m", path, "-t", "shared", "-r", "2")[0] == 0
    finally:
        os.umask(old)
    for f in ("memedit/rows.log", "memedit/frozen.safetensors"):
        assert (path / f).stat().st_mode & 0o777 == 0o644, f


def write_sparse_model(path: Path, n_keys: int = 1024, dim: int = 256) -> tuple[Path, dict[int, torch.Tensor]]:
    """A native folder whose bf16 value table (n_keys² × dim) is a sparse file with a few rows written; returns
    (folder, {row: its values}). Its memory layer's query is constant and two sub-keys stand out, so every lookup
    selects the written row 777,777 first (its sub-keys i, j: 777,777 = i·N + j)."""
    from memedit.lm.memory import MemoryConfig
    from memedit.lm.model import MemoryModel, ModelConfig
    from memedit.lm.tokenizer import WordTokenizer
    from memedit.storage.checkpoint import FORMAT, FORMAT_VERSION

    from .conftest import TINY_TEXTS

    tok = WordTokenizer.from_texts(TINY_TEXTS)
    cfg = ModelConfig(dim=dim, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, multiple_of=16, max_seqlen=32,
                      memory=MemoryConfig(layers=[1], n_keys=n_keys, heads=1, knn=4, k_dim=16))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MemoryModel(cfg).state_dict().items()}
    big = "layers.1.feed_forward.values.weight"
    g = torch.Generator().manual_seed(0)
    small = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items() if k != big}
    q = "layers.1.feed_forward.query_proj.query_mlps.0."
    small[q + "weight"].zero_()
    small[q + "bias"].fill_(1.0)  # every query is all ones
    i, j = divmod(777_777, n_keys)
    small["layers.1.feed_forward.keys"][[i, n_keys + j]] = 10.0  # (2·N, K/2), one head: row half·N + id
    header, off = {}, 0
    for k, t in small.items():
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + t.numel() * 4]}
        off += t.numel() * 4
    nbig = shapes[big][0] * dim * 2
    header[big] = {"dtype": "BF16", "shape": list(shapes[big]), "data_offsets": [off, off + nbig]}
    hj = json.dumps(header).encode()
    hj += b" " * (-len(hj) % 8)
    path.mkdir()
    rows = {5: torch.full((dim,), 0.5), 777_777: torch.full((dim,), -2.0)}
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(hj).to_bytes(8, "little") + hj)
        for t in small.values():
            f.write(t.contiguous().numpy().tobytes())
        start = f.tell()
        for r, v in rows.items():
            f.seek(start + r * dim * 2)
            f.write(v.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
        f.truncate(start + nbig)
    (path / "config.json").write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                  "dtype": "float32", "model": cfg.to_dict(), "meta": {}}))
    tok.save(path / "tokenizer.json")
    return path, rows


def test_a_table_larger_than_memory_loads_mapped_and_looks_up_its_rows(tmp_path):
    # a 16 GiB bf16 value table (4096² slots × 512), sparse on disk: more than this machine's free memory
    path, rows = write_sparse_model(tmp_path / "big", n_keys=4096, dim=512)
    assert (path / "model.safetensors").stat().st_size > 16 << 30
    code = f"""
import re, torch, memedit
def anon():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
a = anon()
m = memedit.load({str(path)!r})
w = m.table("layer1").weight
assert w.dtype == torch.bfloat16 and w.shape == (4096 * 4096, 512)
assert w[5].float().eq(0.5).all() and w[777777].float().eq(-2.0).all() and w[6].float().eq(0).all()
layer = m.memory_layers[1]
with torch.no_grad():
    lk = layer.lookup(torch.randn(3, 512))
    mix = layer.read(lk, torch.float32)  # (3, V): the weighted rows the lookups selected
assert (lk.indices[:, 0, 0] == 777777).all()
want = -2.0 * lk.weights[:, 0, 0:1]  # every other selected row is a hole of the sparse file: zeros
assert torch.allclose(mix, want.to(torch.bfloat16).float().expand(3, 512))
print(anon() - a)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) < 128 << 20  # the 16 GiB table is mapped, not copied
