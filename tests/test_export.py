"""`memedit audit --out` and `memedit export`: HDF5 files read back with h5py and xarray, without memedit."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import xarray as xr

from memedit.auditing.audit import Corpus, audit
from memedit.auditing.hdf5 import read_audit
from memedit.storage.checkpoint import fingerprint, load
from memedit.storage.state import write_frozen_rows

from .conftest import tiny_model
from .test_audit import CORPUS, slow_recount


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(CORPUS) + "\n")
    return p


def test_audit_file_reads_back_with_h5py_and_matches_a_recount(cli, tiny, corpus_file, tmp_path):
    model, path = tiny
    out = tmp_path / "audit.h5"
    code, _, _ = cli("audit", corpus_file, "--model", path, "--out", out, "--batch-size", "3")
    assert code == 0
    counts, weights, subkeys, tokens = slow_recount(model, CORPUS)
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "memedit-slot-stats" and f.attrs["format_version"] == 1
        assert f.attrs["tokens"] == tokens and f.attrs["fingerprint"] == fingerprint(model)
        assert json.loads(f.attrs["model_config"])["memory"]["n_keys"] == 16
        assert str(corpus_file) in f.attrs["corpus"] and f.attrs["memedit_version"]
        assert list(f["layer"][()]) == [0, 2]
        for li, L in enumerate([0, 2]):
            assert f["counts"][li].tolist() == counts[L]
            assert f["subkey_counts"][li].tolist() == subkeys[L]
            np.testing.assert_allclose(f["weights"][li], np.array(weights[L]), atol=1e-5)
        # the shared table's use is the sum over the layers reading it
        np.testing.assert_array_equal(f["table_counts"][0], f["counts"][0] + f["counts"][1])
        d = f["counts"]
        assert d.compression == "gzip" and d.compression_opts == 4 and d.shuffle and d.chunks == (1, 1, 256)
        assert [dim.label or dim[0].name for dim in d.dims] == ["/layer", "/head", "/slot"]
        metrics = json.loads(f.attrs["metrics"])
    assert any(r["scope"] == "table" for r in metrics)
    back = read_audit(out)
    assert back.tokens == tokens and back.counts[1].tolist() == counts[2]


def test_export_opens_in_xarray_with_norms_top_tokens_frozen_rows_and_edit_log(cli, tiny, corpus_file, tmp_path):
    model, path = tiny
    write_frozen_rows(model, {"shared": torch.tensor([3, 7, 200])})
    a = tmp_path / "audit.h5"
    assert cli("audit", corpus_file, "--model", path, "--out", a)[0] == 0
    out = tmp_path / "memory.h5"
    code, _, err = cli("export", "--out", out, "--stats", a, "--model", path, "--top-tokens", "5")
    assert code == 0, err
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert dict(ds.sizes) == {"layer": 2, "head": 2, "slot": 256, "half": 2, "subkey": 16, "table": 1,
                              "rank": 5, "token": model.config.vocab_size}
    assert int(ds.counts.sum()) == ds.attrs["tokens"] * 2 * 2 * 4  # tokens x layers x heads x k
    table = model.table("shared")
    np.testing.assert_allclose(ds.value_norms.sel(table="shared").values,
                               table.weight.float().norm(dim=1).numpy(), rtol=1e-6)
    keys = model.memory_layers[2].keys4d
    np.testing.assert_allclose(ds.key_norms.sel(layer=2, head=1, half=0).values, keys[1, 0].norm(dim=-1).numpy(),
                               rtol=1e-6)
    assert sorted(np.flatnonzero(ds.frozen.sel(table="shared").values)) == [3, 7, 200]
    # top promoted tokens, recomputed here for one slot: unembedding * final norm scale * value_proj * row
    layer = model.memory_layers[0]
    slot = 42
    logits = (model.output.weight * model.norm.weight) @ layer.value_proj.weight @ table.weight[slot]
    assert ds.top_tokens.sel(layer=0, slot=slot).values.tolist() == logits.topk(5).indices.tolist()
    assert ds.vocab.values[ds.top_tokens.sel(layer=0, slot=slot).values[0]] == \
        model.tokenizer.id_to_token(int(logits.argmax()))
    ds.close()
    log = xr.open_dataset(out, engine="h5netcdf", group="edit_log")
    assert log.sizes["edit"] == 0 and log.sizes["touched"] == 0  # never edited
    log.close()


def test_export_holds_the_real_edit_log_of_value_and_key_patches_and_the_frozen_rows(cli, tiny, tmp_path):
    from memedit.lm.hooks import keys_name
    from memedit.storage.patch import Patch

    model, path = tiny
    code, out, err = cli("patch", "add", "--model", path, "--table", "shared", "--rows", "9,3", "--scalar", 0.5,
                         "--out", tmp_path / "v.safetensors", "--apply")
    assert code == 0, err
    value_patch = Patch.load(tmp_path / "v.safetensors")
    corpus = tmp_path / "text.txt"
    corpus.write_text("the cat sat on the mat .\na dog ran in the park .\n")
    code, _, err = cli("keys", "adapt", corpus, "--model", path, "--probe", corpus, "--steps", 1, "--lr", 2.0,
                       "--layer", 2, "--out", tmp_path / "k.safetensors")
    assert code == 0, err
    key_patch = Patch.load(tmp_path / "k.safetensors")
    key_rows = key_patch.change(keys_name(2)).rows.tolist()
    assert cli("keys", "revert", tmp_path / "k.safetensors", "--model", path)[0] == 0
    assert cli("freeze", "--model", path, "--rows", "5,17")[0] == 0
    out = tmp_path / "memory.h5"
    code, _, err = cli("export", "--out", out, "--model", path, "--top-tokens", "0")
    assert code == 0, err
    with h5py.File(out, "r") as f:
        log = f["edit_log"]
        ids = [x.decode() for x in log["patch_id"][()]]
        assert ids == [value_patch.id, key_patch.id, key_patch.id]
        assert [x.decode() for x in log["action"][()]] == ["apply", "apply", "revert"]
        assert [x.decode() for x in log["kind"][()]] == ["add", "keys", "keys"]
        edit, table, row = log["touched_edit"][()], log["touched_table"][()], log["touched_row"][()]
        assert row[edit == 0].tolist() == [3, 9] and {t.decode() for t in table[edit == 0]} == {"shared"}
        for n in (1, 2):
            assert row[edit == n].tolist() == key_rows and {t.decode() for t in table[edit == n]} == {keys_name(2)}
        assert json.loads(log["entry"][0])["tables"] == {"shared": 2}
        shared = [t.decode() for t in f["table"][()]].index("shared")
        assert np.flatnonzero(f["frozen"][shared]).tolist() == [5, 17]


def test_export_refuses_stats_of_another_model_and_non_audits(cli, tiny, corpus_file, tmp_path):
    model, path = tiny
    other = tmp_path / "other"
    from memedit.storage.checkpoint import save

    save(tiny_model(seed=1), other)
    a = tmp_path / "audit.h5"
    assert cli("audit", corpus_file, "--model", other, "--out", a)[0] == 0
    out = tmp_path / "memory.h5"
    code, _, err = cli("export", "--out", out, "--stats", a, "--model", path)
    assert code == 2 and "different model" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    code, _, err = cli("export", "--out", out, "--stats", text, "--model", path)
    assert code == 2 and "not an HDF5 file" in err
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    code, _, err = cli("export", "--out", out, "--stats", plain, "--model", path)
    assert code == 2 and "not a memedit audit" in err
    assert not out.exists()


def test_a_crash_mid_write_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    import memedit.auditing.hdf5 as hdf5

    out = tmp_path / "memory.h5"
    out.write_bytes(b"previous contents")

    def boom(*a, **k):
        yield 0, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(hdf5, "promoted_tokens", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        hdf5.export(out, model, top_k=1)
    assert out.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir() if p.name != "tiny"] == ["memory.h5"]  # no temporary left


def test_export_without_stats_and_on_unshared_tables(tmp_path):
    from memedit.auditing.hdf5 import export
    from memedit.storage.checkpoint import save

    model = load(save(tiny_model(share_values=False), tmp_path / "m"))
    out = export(tmp_path / "x.h5", model, top_k=3)
    ds = xr.open_dataset(out, engine="h5netcdf")
    assert ds.table.values.tolist() == ["layer0", "layer2"] and "counts" not in ds
    assert ds.table_reads_layer.values.tolist() == [[1, 0], [0, 1]]
    ds.close()
    stats = audit(model, Corpus("c", texts=CORPUS))
    out = export(tmp_path / "y.h5", model, stats, top_k=0)
    ds = xr.open_dataset(out, engine="h5netcdf")
    np.testing.assert_array_equal(ds.table_counts.sel(table="layer2").values, ds.counts.sel(layer=2).values)
    ds.close()


def test_example_script_audits_exports_and_plots(tiny, corpus_file, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _, path = tiny
    script = Path(__file__).parent.parent / "examples" / "audit_and_export.py"
    r = subprocess.run([sys.executable, str(script), "--model", str(path), "--corpus", str(corpus_file),
                        "--out", str(tmp_path / "res")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "table shared" in r.stdout and "hub slots" in r.stdout and "promotes" in r.stdout
    assert (tmp_path / "res" / "memory.h5").is_file() and (tmp_path / "res" / "usage.png").is_file()


def test_export_streams_blocks_that_straddle_chunks_and_reports_progress(tmp_path, monkeypatch):
    """More slots than one HDF5 chunk (65,536), readout blocks that do not divide it: the file holds exactly what
    the whole-table computation gives, and progress reaches every slot of every table and layer."""
    import functools

    import memedit.auditing.hdf5 as hdf5
    from memedit.tracing.readout import top_written_tokens

    model = tiny_model(n_keys=272)  # 73,984 slots: two chunks
    n = model.config.memory.n_slots
    steps: list[tuple[int, int]] = []
    whole = hdf5.export(tmp_path / "whole.h5", model, top_k=3, progress=lambda d, t: steps.append((d, t)))
    assert steps[-1] == (n * 3, n * 3)  # one table, two layers
    assert all(a[0] < b[0] for a, b in zip(steps, steps[1:], strict=False))
    monkeypatch.setattr(hdf5, "promoted_tokens",
                        functools.partial(top_written_tokens, budget=model.config.vocab_size * 1000 + 7))
    blocks = hdf5.export(tmp_path / "blocks.h5", model, top_k=3)
    table = model.table("shared").weight
    with h5py.File(whole, "r") as a, h5py.File(blocks, "r") as b:
        for name in ("top_tokens", "top_token_logits", "value_norms"):
            np.testing.assert_array_equal(a[name][()], b[name][()])
        np.testing.assert_allclose(a["value_norms"][0], table.float().norm(dim=1).numpy(), rtol=1e-6)
        folded = (model.output.weight * model.norm.weight) @ model.memory_layers[2].value_proj.weight
        for slot in (0, 65535, 65536, n - 1):
            top = (folded @ table[slot]).topk(3)
            assert a["top_tokens"][1, slot].tolist() == top.indices.tolist()
            np.testing.assert_allclose(a["top_token_logits"][1, slot], top.values.numpy(), rtol=1e-5, atol=1e-6)


def test_a_standalone_module_exports_what_needs_no_vocabulary_with_a_note(cli, tmp_path):
    """XLM / product-key-memory modules have no host LM: export writes norms, frozen rows, the edit log and usage,
    and says why the top tokens are missing, instead of refusing."""
    from product_key_memory import PKM

    from memedit.auditing.hdf5 import NO_TOP_TOKENS, write_audit
    from memedit.auditing.stats import AuditCounter, SlotStats
    from memedit.tracing.capture import on_lookup

    torch.manual_seed(0)
    torch.save(PKM(dim=32, heads=2, num_keys=16, topk=4, dim_head=16).eval().state_dict(), tmp_path / "pkm.pt")
    code, out, err = cli("export", "--model", tmp_path / "pkm.pt", "--out", tmp_path / "x.h5")
    assert code == 0, err
    assert "top tokens skipped" in out and "host language model" in out
    folder = tmp_path / "native"
    assert cli("convert", folder, "--model", tmp_path / "pkm.pt", "--knn", 4)[0] == 0
    assert cli("freeze", "--model", folder, "--rows", "3,7", "--table", "layer0")[0] == 0
    code, _, err = cli("patch", "set", "--model", folder, "--table", "layer0", "--rows", "5", "--scalar", 0,
                       "--apply")
    assert code == 0, err
    model = load(folder)  # usage from lookups on query vectors (a standalone module has no text to audit)
    counter = AuditCounter(model)
    with on_lookup(model, counter), torch.no_grad():
        counter.batch(torch.ones(40, dtype=torch.bool))
        model.memory_layers[0](torch.randn(1, 40, 32))
    write_audit(tmp_path / "a.h5", SlotStats.counted(counter, 40, "query vectors", fingerprint(model),
                                                      model.config.to_dict()))
    code, out, err = cli("export", "--model", folder, "--out", tmp_path / "y.h5", "--stats", tmp_path / "a.h5",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["note"] == NO_TOP_TOKENS
    with h5py.File(tmp_path / "y.h5", "r") as f:
        assert f.attrs["note"] == NO_TOP_TOKENS and "top_tokens" not in f and "vocab" not in f
        assert f["value_norms"].shape == (1, 256) and f["value_norms"][0, 5] == 0  # the row set to 0
        assert f["key_norms"].shape == (1, 2, 2, 16)
        assert np.flatnonzero(f["frozen"][0]).tolist() == [3, 7]
        assert [x.decode() for x in f["edit_log"]["action"][()]] == ["apply"]
        assert int(f["counts"][()].sum()) == 40 * 2 * 4  # 40 queries x 2 heads x k 4
