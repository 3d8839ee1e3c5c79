"""Tokens are shown as the text they decode to (' Shoush'), never as vocabulary symbols ('ĠShoush'), by every
command and the report; --json keeps the ids beside the text."""

from __future__ import annotations

import json

import pytest

from memedit.lm.tokenizer import byte_level_alphabet, token_text


def test_byte_level_tokens_show_their_text(demo):
    tok = demo.tokenizer
    ids = tok.encode(" Shoushour was born in é")
    shown = [token_text(tok, i) for i in ids]
    assert shown[:4] == [" Shoush", "our", " was", " born"]
    assert shown[-2:] == ["\\xc3", "\\xa9"]  # é is two byte tokens here: each shows as the byte it holds
    assert token_text(tok, tok.bos_id) == "<s>"  # a special token keeps its symbol
    assert token_text(tok, tok.vocab_size + 3) == f"<id {tok.vocab_size + 3}>"
    assert token_text(tok, tok.tok.token_to_id("Ċ")) == "\\n"  # the newline byte is escaped, not printed
    every = [token_text(tok, i) for i in range(tok.vocab_size)]
    assert not any("Ġ" in t for t in every)  # the report's vocabulary and the HDF5 export use this same text


def test_the_byte_level_alphabet_covers_every_byte():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n") and alphabet["A"] == ord("A")


def test_inspect_and_slot_show_decoded_text_and_json_keeps_ids(cli, tmp_path):
    code, out, _ = cli("inspect", "Reidreir was born in")
    assert code == 0 and "Ġ" not in out and "' Shoush'" in out
    code, out, _ = cli("inspect", "Reidreir was born in", "--json")
    d = json.loads(out)
    assert len(d["tokens"]) == len(d["token_ids"]) and d["target"]["token_ids"][0] == d["target"]["token_id"]
    assert d["target"]["tokens"][0] == " Shoush" and d["top"][0] == pytest.approx(
        {"token": " Shoush", "token_id": d["target"]["token_id"], "prob": d["top"][0]["prob"]})
    promoted = d["top_slots"][0]["promotes"][0]
    assert set(promoted) == {"token", "token_id", "logit"} and "Ġ" not in promoted["token"]
    slot = d["top_slots"][0]["slot"]
    audit = tmp_path / "a.h5"
    code, _, _ = cli("audit", "--out", audit, "--contexts", "4", "--tokens", "3000")
    assert code == 0
    code, out, _ = cli("slot", slot, "--stats", audit)
    assert code == 0 and "promotes" in out and "Ġ" not in out
    code, out, _ = cli("slot", slot, "--stats", audit, "--json")
    d = json.loads(out)
    assert all("token_id" in x for w in d["writes"] for x in w["promotes"])
    for c in d["contexts"] or []:
        assert len(c["text"]) == len(c["tokens"]) and not any("Ġ" in t for t in c["text"] if t)


def test_every_tokenizer_kind_shows_decoded_text(tmp_path):
    """SentencePiece ('▁cat'), tiktoken (bytes), lingua's bytes and a HuggingFace tokenizer without a byte-level
    decoder: the shown text of a sentence's tokens, joined, is the sentence; special tokens keep their symbol."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("tiktoken")
    from memedit.storage.importers.tokenizers import BytesTokenizer, load_path

    from .test_importers import make_tokenizer_files

    files = make_tokenizer_files(tmp_path)
    sp = load_path(files["sp"][0])
    shown = [token_text(sp, i) for i in sp.encode("the cat")]
    assert "".join(shown) == " the cat" and not any("▁" in t for t in shown)
    assert token_text(sp, sp.bos_id) == "<s>"
    tk = load_path(files["tiktoken"][0], "tiktoken")
    assert [token_text(tk, i) for i in tk.encode("the cat")] == ["the", " c", "a", "t"]
    assert token_text(tk, tk.bos_id) == "<|begin_of_text|>"
    by = BytesTokenizer()
    assert "".join(token_text(by, i) for i in by.encode("née\n")) == "n\\xc3\\xa9e\\n"  # é split over two bytes
    assert token_text(by, by.bos_id) == "<bos>"
    hf = load_path(files["hf"][0])  # Whitespace pre-tokenizer, no decoder: the symbols are the words
    assert [token_text(hf, i) for i in hf.encode("the cat")] == ["the", "cat"]
