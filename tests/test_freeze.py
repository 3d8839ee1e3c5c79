"""Freezing value rows as a user does it: by ids, by a fact's core set, by usage, from a file; every write path
refuses or masks frozen rows; sub-key entries of the same file are kept."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .conftest import TINY_TEXTS


def test_freeze_list_unfreeze(cli, tiny):
    _, path = tiny
    code, out, _ = cli("freeze", "-m", path, "--rows", "3,5-7", "--json")
    assert code == 0 and json.loads(out)["added"] == {"shared": 4}
    code, out, _ = cli("frozen", "-m", path, "--json")
    assert json.loads(out) == {"shared": [3, 5, 6, 7]}
    # the file on disk, read back with safetensors directly
    assert load_file(str(path / "memedit" / "frozen.safetensors"))["shared"].tolist() == [3, 5, 6, 7]
    code, _, err = cli("patch", "zero", "-m", path, "-t", "shared", "-r", "1-6", "--apply")
    assert code == 2 and "rows 3, 5, 6 of table shared are frozen" in err
    assert cli("unfreeze", "-m", path, "--rows", "5")[0] == 0
    assert json.loads(cli("frozen", "-m", path, "--json")[1]) == {"shared": [3, 6, 7]}
    assert cli("unfreeze", "-m", path, "--all")[0] == 0
    assert cli("frozen", "-m", path)[1].strip() == "no frozen rows"
    assert cli("patch", "zero", "-m", path, "-t", "shared", "-r", "1-6", "--apply")[0] == 0


def test_sub_key_entries_are_kept(cli, tiny):
    _, path = tiny
    (path / "memedit").mkdir()
    save_file({"keys.layer2": torch.tensor([1, 4])}, str(path / "memedit" / "frozen.safetensors"))
    cli("freeze", "-m", path, "--rows", "9")
    cli("unfreeze", "-m", path, "--all")
    kept = load_file(str(path / "memedit" / "frozen.safetensors"))
    assert kept["keys.layer2"].tolist() == [1, 4] and "shared" not in kept
    assert json.loads(cli("frozen", "-m", path, "--json")[1]) == {}


def test_freeze_a_fact_core_set(cli, tiny, tmp_path):
    from memedit.tracing.capture import core_set

    model, path = tiny
    fact = {"id": "r1", "prompt": "{} was born in", "subject": "Reidreir", "target_true": "Thakrian",
            "paraphrases": ["Reidreir was born in"]}
    (tmp_path / "facts.jsonl").write_text(json.dumps(fact) + "\n")
    code, out, err = cli("freeze", "-m", path, "--fact", "r1", "--facts", tmp_path / "facts.jsonl", "--json")
    assert code == 0, err
    want = core_set(model, ["Reidreir was born in", "Reidreir was born in"])["shared"]
    assert want and json.loads(cli("frozen", "-m", path, "--json")[1])["shared"] == want


def test_freeze_hot_rows_and_from_file(cli, tiny, tmp_path):
    _, path = tiny
    (tmp_path / "corpus.txt").write_text("\n".join(TINY_TEXTS * 10) + "\n")
    assert cli("background", tmp_path / "corpus.txt", "-m", path, "--batch-size", "3")[0] == 0
    counts = load_file(str(path / "memedit" / "background.safetensors"))["counts.shared"]
    code, out, _ = cli("freeze", "-m", path, "--hot", "5", "--json")
    assert code == 0
    got = json.loads(cli("frozen", "-m", path, "--json")[1])["shared"]
    assert len(got) == 5 and counts[got].min() >= counts.sort(descending=True).values[4]
    np.save(tmp_path / "ids.npy", np.array([200, 201]))
    (tmp_path / "ids.txt").write_text("10\n12-13\n")
    assert cli("freeze", "-m", path, "--file", tmp_path / "ids.npy")[0] == 0
    assert cli("freeze", "-m", path, "--file", tmp_path / "ids.txt")[0] == 0
    assert {10, 12, 13, 200, 201} <= set(json.loads(cli("frozen", "-m", path, "--json")[1])["shared"])


def test_freeze_bad_input(cli, tiny):
    _, path = tiny
    code, _, err = cli("freeze", "-m", path, "--rows", "999")
    assert code == 2 and "out of range" in err
    code, _, err = cli("freeze", "-m", path)
    assert code == 2 and "nothing to freeze" in err
    assert not (path / "memedit" / "frozen.safetensors").exists()


def test_freeze_hot_rows_by_an_audit_file(cli, tiny, tmp_path):
    import h5py

    from memedit.storage.checkpoint import save

    from .conftest import tiny_model

    _, path = tiny
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TINY_TEXTS * 5) + "\n")
    audit = tmp_path / "audit.h5"
    assert cli("audit", corpus, "-m", path, "--out", audit)[0] == 0
    with h5py.File(audit, "r") as f:  # read back independently of memedit
        usage = f["table_counts"][0].sum(0)  # (H, S) -> (S,) accesses of the shared table's rows
    # an edit in between: the audit is still of this model folder (its edit log says so)
    assert cli("patch", "add", "-m", path, "-t", "shared", "-r", "0", "--scalar", "0.1", "--apply")[0] == 0
    code, out, err = cli("freeze", "-m", path, "--hot", "6", "--stats", audit, "--json")
    assert code == 0, err
    got = json.loads(cli("frozen", "-m", path, "--json")[1])["shared"]
    assert len(got) == 6 and usage[got].min() >= np.sort(usage)[::-1][5] > 0

    other = save(tiny_model(seed=1), tmp_path / "other")
    theirs = tmp_path / "theirs.h5"
    assert cli("audit", corpus, "-m", other, "--out", theirs)[0] == 0
    code, _, err = cli("freeze", "-m", path, "--hot", "6", "--stats", theirs)
    assert code == 2 and "different model" in err
    code, _, err = cli("freeze", "-m", path, "--stats", audit)
    assert code == 2 and "--hot" in err
    code, _, err = cli("freeze", "-m", path, "--hot", "6", "--stats", corpus)
    assert code == 2 and "not an HDF5 file" in err
