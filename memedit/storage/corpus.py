"""Reading the user's text: one corpus reader for every command that reads text (audit, background statistics,
verification, key adaptation and routing)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import MemeditError
from ..limits import MAX_TEXT_CHARS


@dataclass
class Corpus:
    """A stream of documents: a text file (one document per line), a JSONL file with a "text" field, or a list."""

    description: str
    path: Path | None = None
    texts: list[str] | None = None

    @classmethod
    def open(cls, source: str | Path) -> Corpus:
        """The corpus at ``source`` (the demo world's default corpus is auditing.audit.open_corpus's choice)."""
        path = Path(source).expanduser()
        if not path.exists():
            raise MemeditError(f"corpus {path} does not exist")
        if not path.is_file():
            raise MemeditError(f"corpus {path} is not a file (give a text file, one document per line, or JSONL)")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise MemeditError(f"cannot read corpus {path}: {e.strerror}") from None
        return cls(description=str(path), path=path)

    def documents(self) -> Iterator[tuple[str, float]]:
        """(document text, fraction of the corpus read so far) for every non-empty document."""
        if self.texts is not None:
            n = len(self.texts)
            for i, t in enumerate(self.texts, 1):
                if t.strip():
                    yield t, i / n
            return
        assert self.path is not None
        size = max(self.path.stat().st_size, 1)
        jsonl = self.path.suffix.lower() in (".jsonl", ".ndjson")
        done = 0
        try:
            with open(self.path, "rb") as f:
                n = 0
                while raw := f.readline(4 * MAX_TEXT_CHARS + 1):  # a line is read only up to the cap
                    n += 1
                    if len(raw) > MAX_TEXT_CHARS and len(raw.decode("utf-8", "replace").rstrip("\r\n")) > MAX_TEXT_CHARS:
                        raise MemeditError(f"{self.path}:{n}: the line has more than {MAX_TEXT_CHARS:,} characters "
                                           "(memedit reads at most that a line); split it")
                    done += len(raw)
                    try:
                        line = raw.decode("utf-8").strip()
                    except UnicodeDecodeError:
                        raise MemeditError(f"{self.path}:{n} is not UTF-8 text; give a text or JSONL corpus") from None
                    if not line:
                        continue
                    if jsonl:
                        line = _jsonl_text(line, self.path, n)
                        if not line.strip():
                            continue
                    yield line, done / size
        except OSError as e:
            raise MemeditError(f"cannot read corpus {self.path}: {e.strerror}") from None


def _jsonl_text(line: str, path: Path, n: int) -> str:
    try:
        rec = json.loads(line)
    except ValueError:
        raise MemeditError(f"{path}:{n} is not valid JSON (a .jsonl corpus needs one object per line)") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise MemeditError(f'{path}:{n} has no "text" field (a .jsonl corpus needs {{"text": ...}} per line)')
    return rec["text"]


def read_texts(source: str | Path, what: str = "corpus") -> list[str]:
    """The non-empty documents of a text file (one a line, stripped) or a JSONL file (its "text" fields)."""
    texts = [text for text, _ in Corpus.open(source).documents()]
    if not texts:
        raise MemeditError(f"the {what} {source} tokenizes to nothing: it has no text lines")
    return texts
