"""Tokenizers that imported checkpoints bring: lingua's ``bytes``, SentencePiece, tiktoken, HuggingFace
``tokenizer.json``.

Each one saves itself as ONE self-contained ``tokenizer.json`` (the native folder's tokenizer file), so a converted
model needs nothing outside its folder. sentencepiece, tiktoken and tokenizers are optional extras: a missing one is
a one-line error naming the extra to install.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from ...errors import MemeditError
from ...lm.tokenizer import Tokenizer, WordTokenizer, byte_level_alphabet
from ..files import atomic_write_text

# lingua's tiktoken setup: 256 special ids after the BPE ranks, these named, the rest reserved
TIKTOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TIKTOKEN_SPECIALS = {
    "<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|fim_prefix|>": 2, "<|fim_middle|>": 3,
    "<|fim_end_fill|>": 253, "<|fim_pad|>": 254, "<|fim_suffix|>": 255,
}


def _require(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise MemeditError(
            f"this tokenizer needs the {module} package: pip install 'memedit[{extra}]'"
        ) from None


def _save_json(path: str | Path, data: dict) -> None:
    atomic_write_text(Path(path), json.dumps(data))


class BytesTokenizer:
    """lingua's byte tokenizer: ids 0..255 are UTF-8 bytes, 256 is BOS, 257 is EOS."""

    def __init__(self, vocab_size: int = 258):
        self.bos_id, self.eos_id, self.pad_id = 256, 257, None
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise MemeditError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if 32 <= i < 127:
            return chr(i)
        return {256: "<bos>", 257: "<eos>"}.get(i, f"\\x{i:02x}" if i < 256 else f"<id {i}>")

    def token_bytes(self, i: int) -> bytes | None:
        """The bytes token ``i`` decodes to; None for BOS and EOS."""
        return bytes([i]) if 0 <= i < 256 else None

    def save(self, path: str | Path) -> None:
        _save_json(path, {"memedit_tokenizer": "bytes", "vocab_size": self.vocab_size})


class SentencePieceTokenizer:
    """A SentencePiece model (lingua's ``sp``); BOS/EOS as the model defines them."""

    def __init__(self, proto: bytes):
        spm = _require("sentencepiece", "sentencepiece")
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = _or_none(self.sp.bos_id()), _or_none(self.sp.eos_id())
        self.pad_id = _or_none(self.sp.pad_id())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def token_bytes(self, i: int) -> bytes | None:
        """The bytes piece ``i`` decodes to ('▁' is a space, '<0x0A>' one byte); None for a control piece."""
        i = int(i)
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return None
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def save(self, path: str | Path) -> None:
        _save_json(path, {"memedit_tokenizer": "sentencepiece", "model": base64.b64encode(self.proto).decode()})


class TiktokenTokenizer:
    """A tiktoken BPE file set up as lingua does (256 special ids after the ranks; BOS <|begin_of_text|>)."""

    def __init__(self, bpe_text: str, name: str = "tokenizer"):
        tiktoken = _require("tiktoken", "tiktoken")
        self.bpe_text = bpe_text
        ranks: dict[bytes, int] = {}
        for line in bpe_text.splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        specials = dict(TIKTOKEN_SPECIALS)
        for i in set(range(256)) - set(specials.values()):
            specials[f"<|reserved_special_token_{i}|>"] = i
        specials = {k: v + len(ranks) for k, v in specials.items()}
        self.enc = tiktoken.Encoding(name=name, pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.vocab_size = self.enc.n_vocab
        self.n_ranks = len(ranks)
        self.bos_id = specials["<|begin_of_text|>"]
        self.eos_id = specials["<|end_of_text|>"]
        self.pad_id = None

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def id_to_token(self, i: int) -> str:
        return self.enc.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes | None:
        """The bytes token ``i`` decodes to; None for a special token."""
        return self.enc.decode_single_token_bytes(int(i)) if 0 <= int(i) < self.n_ranks else None

    def save(self, path: str | Path) -> None:
        _save_json(path, {"memedit_tokenizer": "tiktoken", "bpe": self.bpe_text})


class HFTokenizer:
    """A HuggingFace ``tokenizer.json``; BOS is the first of <s>, <|begin_of_text|>, <bos> it knows."""

    def __init__(self, text: str):
        tokenizers = _require("tokenizers", "tokenizers")
        self.text = text
        try:
            self.tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust library raises its own exception type
            raise MemeditError(f"not a valid HuggingFace tokenizer.json: {str(e).splitlines()[0]}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._first("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
        self.eos_id = self._first("</s>", "<|end_of_text|>", "<eos>", "[SEP]")
        self.pad_id = self._first("<pad>", "[PAD]")
        data = json.loads(text)
        self.special = {int(t["id"]) for t in data.get("added_tokens") or [] if t.get("special", True)}
        dec = data.get("decoder") or {}
        steps = [dec, *(dec.get("decoders") or [])]
        self.decoding = {d.get("type") for d in steps if isinstance(d, dict)}  # ByteLevel, Metaspace, ByteFallback...
        self.alphabet = byte_level_alphabet() if "ByteLevel" in self.decoding else None

    def _first(self, *names: str) -> int | None:
        for n in names:
            i = self.tok.token_to_id(n)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(int(i)) or f"<{i}>"

    def token_bytes(self, i: int) -> bytes | None:
        """The bytes token ``i`` decodes to, from its vocabulary symbol and the tokenizer's decoder ('ĠParis' of a
        byte-level BPE is b' Paris'; '▁Paris' of a Metaspace one too; '<0x0A>' of a byte fallback one byte); None
        for a special token or a symbol no decoder here reads."""
        i = int(i)
        sym = self.tok.id_to_token(i)
        if sym is None or i in self.special:
            return None
        if self.alphabet is not None:
            if all(c in self.alphabet for c in sym):
                return bytes(self.alphabet[c] for c in sym)
            return sym.encode("utf-8")  # an added, non-special token is stored as plain text
        if "ByteFallback" in self.decoding and len(sym) == 6 and sym.startswith("<0x") and sym.endswith(">"):
            return bytes([int(sym[3:5], 16)])
        if "Metaspace" in self.decoding or "Replace" in self.decoding:
            return sym.replace("\u2581", " ").encode("utf-8")
        return None

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.text)


def _or_none(i: int) -> int | None:
    return None if i < 0 else i


def from_json(data: dict, path: Path):
    """The tokenizer a parsed ``tokenizer.json`` describes (memedit's own kinds or HuggingFace's)."""
    kind = data.get("memedit_tokenizer")
    try:
        if kind == "bytes":
            return BytesTokenizer(int(data.get("vocab_size", 258)))
        if kind == "sentencepiece":
            return SentencePieceTokenizer(base64.b64decode(data["model"]))
        if kind == "tiktoken":
            return TiktokenTokenizer(data["bpe"], path.stem)
    except (KeyError, ValueError, TypeError) as e:
        raise MemeditError(f"{path} is a damaged {kind} tokenizer file ({e})") from None
    if kind is None and "model" in data and ("added_tokens" in data or "version" in data):
        return HFTokenizer(json.dumps(data))
    raise MemeditError(f"{path} is not a tokenizer memedit can read")


def load_path(path: str | Path, kind: str | None = None):
    """A tokenizer from a file: ``kind`` is lingua's name (sp, tiktoken, bytes) or None to guess from the file."""
    path = Path(path).expanduser()
    if kind == "bytes":
        return BytesTokenizer()
    if not path.is_file():
        raise MemeditError(f"tokenizer file {path} does not exist (pass --tokenizer PATH)")
    data = path.read_bytes()
    if kind is None and path.suffix == ".json":
        return load_tokenizer(path)
    if kind in ("sp", "sentencepiece") or (kind is None and path.suffix == ".model"):
        try:
            return SentencePieceTokenizer(data)
        except MemeditError:
            raise
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise MemeditError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
    if kind in ("tiktoken", None):
        try:
            text = data.decode("ascii")
            return TiktokenTokenizer(text, path.stem)
        except MemeditError:
            raise
        except (UnicodeDecodeError, ValueError) as e:
            if kind is None:
                raise MemeditError(f"{path}: unknown tokenizer format (give a SentencePiece .model, a tiktoken "
                                   "file or a tokenizer.json)") from None
            raise MemeditError(f"{path} is not a tiktoken BPE file ({e})") from None
    raise MemeditError(f"unknown tokenizer kind {kind!r} (memedit reads sp, tiktoken, bytes)")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json: memedit's word vocabulary, an imported kind saved by memedit, or a HuggingFace file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MemeditError(f"cannot read tokenizer {path}: {e}") from None
    if isinstance(data, dict) and data.get("memedit_tokenizer") == "word":
        return WordTokenizer(data["vocab"])
    if not isinstance(data, dict):
        raise MemeditError(f"{path} is not a tokenizer memedit can read")
    return from_json(data, path)
