"""Tokenizers. memedit needs only :class:`Tokenizer`'s small interface; imported checkpoints bring their own."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import MemeditError

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


@runtime_checkable
class Tokenizer(Protocol):
    """What memedit needs of a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def id_to_token(self, i: int) -> str: ...


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary (the demo world is closed, so this covers it)."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, vocab: list[str]):
        if list(vocab[: len(self.SPECIALS)]) != list(self.SPECIALS):
            raise MemeditError(f"a word tokenizer's vocabulary must start with {self.SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        if len(self.index) != len(self.vocab):
            raise MemeditError("the tokenizer vocabulary has duplicate entries")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.vocab_size = len(self.vocab)

    @classmethod
    def from_texts(cls, texts) -> WordTokenizer:
        words: dict[str, None] = {}
        for t in texts:
            for w in _WORD.findall(t):
                words.setdefault(w, None)
        return cls(list(cls.SPECIALS) + sorted(words))

    def tokens(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in _WORD.findall(text)]

    def decode(self, ids: list[int]) -> str:
        out = ""
        for i in ids:
            w = self.id_to_token(int(i))
            if w in self.SPECIALS[:3]:
                continue
            out += w if (not out or re.fullmatch(r"[^\w\s]", w) and w not in "(") else " " + w
        return out

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise MemeditError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self.vocab[i]

    def to_json(self) -> dict:
        return {"memedit_tokenizer": "word", "vocab": self.vocab}

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as tokenizer.json (not atomically: memedit saves into a folder it publishes whole)."""
        Path(path).write_text(json.dumps(self.to_json()))


def byte_level_alphabet() -> dict[str, int]:
    """The byte each symbol character of a byte-level BPE vocabulary stands for (GPT-2's ``bytes_to_unicode``,
    inverted): printable bytes stand for themselves, the others are shifted past 255 (a space is ``Ġ``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def shown(text: str) -> str:
    """``text`` with its non-printable characters escaped (a newline as ``\\n``), spaces kept."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def token_text(tok: Tokenizer | None, i: int) -> str:
    """Token ``i`` as the text it decodes to, to show a person: ``' Paris'``, not the vocabulary symbol ``'ĠParis'``.

    Bytes that are not whole UTF-8 (a byte-level token holding part of a character) show as ``\\xNN``, other
    non-printable characters escaped (a newline as ``\\n``); a special token shows its symbol (``<s>``), and an id
    the tokenizer cannot decode (a padded vocabulary has ids past the tokenizer's) ``<id N>``. Every command and the
    report show tokens through this one function; ``--json`` output keeps the ids beside it.
    """
    i = int(i)
    if tok is None or not 0 <= i < tok.vocab_size:
        return f"<id {i}>"
    try:
        raw = tok.token_bytes(i) if hasattr(tok, "token_bytes") else None  # None: a special token, or no bytes
        t = raw.decode("utf-8", errors="backslashreplace") if raw is not None else tok.id_to_token(i)
    except (MemeditError, ValueError, IndexError, KeyError, TypeError):
        return f"<id {i}>"
    if t is None:
        return f"<id {i}>"
    return shown(t)
