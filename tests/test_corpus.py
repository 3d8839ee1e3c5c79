"""The one corpus reader (memedit/storage/corpus.py) that audit, background, verify and keys read text with."""

from __future__ import annotations

import json

import pytest

from memedit.errors import MemeditError
from memedit.storage.corpus import read_texts

from .conftest import TINY_TEXTS


def test_text_and_jsonl_give_the_same_documents(tmp_path):
    text, jsonl = tmp_path / "c.txt", tmp_path / "c.jsonl"
    text.write_text("\n".join(TINY_TEXTS) + "\n\n")
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": n}) for n, t in enumerate(TINY_TEXTS)) + "\n")
    assert read_texts(text) == read_texts(jsonl) == TINY_TEXTS


@pytest.mark.parametrize("content, message", [
    ("\n  \n", "tokenizes to nothing"),
    (b"\xff\xfe not text\n", "not UTF-8"),
])
def test_bad_text_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "c.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MemeditError, match=message):
        read_texts(path)
    with pytest.raises(MemeditError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"no_text": 1}\n')
    with pytest.raises(MemeditError, match='has no "text" field'):
        read_texts(bad)


def test_background_reads_a_jsonl_corpus(cli, tiny, tmp_path):
    _, path = tiny
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in TINY_TEXTS * 2) + "\n")
    code, out, err = cli("background", corpus, "-m", path, "--batch-size", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["n_batches"] == 3
