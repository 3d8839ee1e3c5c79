"""`memedit audit diff A.h5 B.h5`: how use changed between two audits, e.g. before and after changing sub-keys."""

from __future__ import annotations

import json

import torch

from memedit.storage.checkpoint import save

from .conftest import tiny_model
from .test_audit import CORPUS


def test_diff_before_and_after_a_key_change(cli, tiny, tmp_path):
    model, path = tiny
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    before, after = tmp_path / "before.h5", tmp_path / "after.h5"
    assert cli("audit", corpus, "--model", path, "--out", before)[0] == 0
    changed = tiny_model()
    with torch.no_grad():  # push one first-half sub-key of layer 0, head 0 far out: its 16 slots win more lookups
        changed.memory_layers[0].keys4d[0, 0, 5] *= 50
    save(changed, tmp_path / "changed")
    assert cli("audit", corpus, "--model", tmp_path / "changed", "--out", after)[0] == 0

    code, out, err = cli("audit", "diff", before, after, "--json", "--top", "5")
    assert code == 0, err
    d = json.loads(out)
    assert d["same_model"] is False and d["tokens"][0] == d["tokens"][1]
    t = d["tables"]["shared"]
    # recompute from the files themselves
    import h5py

    with h5py.File(before) as fa, h5py.File(after) as fb:
        ca, cb = fa["table_counts"][0].sum(0), fb["table_counts"][0].sum(0)
        tokens = fa.attrs["tokens"]
    delta = (cb - ca) * 1000 / tokens
    best = sorted(delta, reverse=True)[:5]
    assert [s["change"] for s in t["gained"]] == [float(x) for x in best if x > 0]  # ties may list other slots
    assert all(s["change"] == delta[s["slot"]] for s in t["gained"] + t["lost"])
    assert t["died"] == int(((ca > 0) & (cb == 0)).sum()) and t["came_alive"] == int(((ca == 0) & (cb > 0)).sum())
    assert any(s["slot"] // 16 == 5 for s in t["gained"])  # slots of sub-key 5 (slot = i*N + j)
    gini = next(m for m in d["metrics"] if m["scope"] == "layer 0" and m["basis"] == "count")["gini"]
    assert gini["change"] == gini["after"] - gini["before"]

    code, text, _ = cli("audit", "diff", before, after)
    assert code == 0 and "table shared" in text and "gained" in text and "metric changes" in text


def test_diff_of_an_audit_with_itself_changes_nothing(cli, tiny, tmp_path):
    _, path = tiny
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    a = tmp_path / "a.h5"
    cli("audit", corpus, "--model", path, "--out", a)
    code, out, _ = cli("audit", "diff", a, a, "--json")
    d = json.loads(out)
    assert code == 0 and d["same_model"] is True
    assert d["tables"]["shared"]["gained"] == [] and d["tables"]["shared"]["changed_slots"] == 0
    assert all(m["used"]["change"] == 0 for m in d["metrics"])


def test_diff_refuses_files_that_are_not_audits(cli, tiny, tmp_path):
    model, path = tiny
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    a = tmp_path / "a.h5"
    cli("audit", corpus, "--model", path, "--out", a)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    exported = tmp_path / "export.h5"
    assert cli("export", "--out", exported, "--model", path, "--top-tokens", "0")[0] == 0
    big = tmp_path / "big"
    save(tiny_model(n_keys=32), big)
    b = tmp_path / "b.h5"
    cli("audit", corpus, "--model", big, "--out", b)
    cases = [((a, notes), "not an HDF5 file"), ((a, tmp_path / "nope.h5"), "does not exist"),
             ((exported, a), "holds no slot statistics"), ((a, b), "differently shaped"), ((a,), "two audit files")]
    for files, message in cases:
        code, _, err = cli("audit", "diff", *files)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (files, err)


def test_diff_is_a_subcommand_even_beside_a_corpus_named_diff(cli, tiny, tmp_path, monkeypatch):
    _, path = tiny
    monkeypatch.chdir(tmp_path)
    (tmp_path / "diff").write_text("\n".join(CORPUS) + "\n")  # a corpus file that happens to be called diff
    a = tmp_path / "a.h5"
    assert cli("audit", "run", "diff", "--model", path, "--out", a)[0] == 0  # `audit run` audits it
    code, out, err = cli("audit", "diff", a, a, "--json")  # and `audit diff` still compares two audits
    assert code == 0, err
    assert json.loads(out)["tables"]["shared"]["changed_slots"] == 0
    code, _, err = cli("audit", "diff", a)
    assert code == 2 and "two audit files" in err
