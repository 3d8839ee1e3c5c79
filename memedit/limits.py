"""What memedit refuses before it starts work: counts past the caps below, ids past int64, numbers that are not
finite, text that is not UTF-8, and files that are not files. The caps live here, in one place, so that a
command's --help and its error name the same number; every library function that takes such a value checks it
with these helpers, so a Python caller is refused the same way as the command line."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import MemeditError

INT64_MAX = 2**63 - 1

# Caps: the most one run of a command does on one machine. Each flag's --help states its cap.
MAX_GENERATE_TOKENS = 100_000  # generate -n (the model's context bounds it further)
MAX_CAUSAL_SAMPLES = 1_000  # trace-causal --samples (ROME averages 10)
MAX_NOISE = 1_000.0  # trace-causal --noise, in embedding standard deviations
MAX_RANDOM_QUERIES = 100_000  # verify --random, per memory layer (n × heads × K float32 held at once)
MAX_VERIFY_LIMIT = 100_000_000  # verify --limit
MAX_THREADS = os.cpu_count() or 1  # verify --threads: more threads than cores only wait (and 100,000 crashed FAISS)
MAX_TOP_TOKENS = 1_000  # export --top-tokens
MAX_CONTEXT_BYTES = 1 << 30  # audit --contexts: the top contexts held in memory, all tables together
MAX_ADAPT_STEPS = 100_000  # keys adapt --steps
MAX_BATCH_SIZE = 65_536  # documents per forward pass (audit, background, keys adapt --batch-size)
MAX_BATCHES = 1_000_000_000  # background --max-batches
MAX_EPOCHS = 1_000  # train --epochs (the bundled model took 9)
MAX_LR = 1e6  # edit --lr, keys adapt --lr: a larger step overflows bfloat16 rows, it cannot be meant
MAX_TEXT_CHARS = 1_000_000  # one prompt, subject or target; one line of a text or JSONL file
MAX_FILE_BYTES = 256 << 20  # a file read whole (--requests, --facts, freeze --file)


def count(value: int, flag: str, lo: int = 1, hi: int = INT64_MAX) -> int:
    """``value`` if it is an integer in lo..hi; else one line naming ``flag`` and the bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MemeditError(f"{flag} must be a whole number, not {value!r}")
    if not lo <= value <= hi:
        raise MemeditError(f"{flag} {value:,} is out of range: give {lo:,} to {hi:,}")
    return value


def seed(value: int, flag: str = "--seed") -> int:
    """``value`` if torch can seed with it (a signed 64-bit integer)."""
    return count(value, flag, -INT64_MAX - 1, INT64_MAX)


def number(value: float, flag: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """``value`` as a float if it is finite and within [lo, hi] ((lo, hi] with ``lo_open``); else one line."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise MemeditError(f"{flag} must be a number, not {value!r}") from None
    if not math.isfinite(x):
        raise MemeditError(f"{flag} must be a finite number, not {value}")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise MemeditError(f"{flag} {value} is out of range: give a number {'above' if lo_open else 'of at least'} {lo:g}"
                           + (f" and at most {hi:g}" if hi is not None else ""))
    if hi is not None and x > hi:
        raise MemeditError(f"{flag} {value} is out of range: give at most {hi:g}")
    return x


def row_id(value: int, what: str = "row") -> int:
    """``value`` if it can be a row id at all (0 .. 2^63-1); the table's own range is checked where it is known."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MemeditError(f"{what} id {value!r} is not a whole number")
    if not 0 <= value <= INT64_MAX:
        raise MemeditError(f"{what} id {value} is out of range (ids are 0 or more and fit in 64 bits)")
    return value


def text(value: str, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``value`` if it is a str of valid Unicode (an argument holding bytes that are not UTF-8 arrives with lone
    surrogates) no longer than ``limit`` characters; else one line naming ``what``."""
    if not isinstance(value, str):
        raise MemeditError(f"{what} must be text, not {type(value).__name__} {value!r:.40}")
    if len(value) > limit:
        raise MemeditError(f"{what} has {len(value):,} characters; memedit reads at most {limit:,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start].encode("utf-8", "surrogateescape")
        raise MemeditError(f"{what} is not valid UTF-8 (byte {bad!r} at character {e.start}); memedit reads text as "
                           "UTF-8: convert it first (e.g. iconv -t UTF-8)") from None
    return value


def input_file(path: str | Path, what: str, max_bytes: int = MAX_FILE_BYTES) -> Path:
    """``path`` if it is a regular file of at most ``max_bytes`` (not a folder, a device or a pipe)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MemeditError(f"{what} {path} does not exist")
    if not path.is_file():
        raise MemeditError(f"{what} {path} is not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise MemeditError(f"{what} {path} has {size:,} bytes; memedit reads at most {max_bytes:,}")
    return path


def read_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a regular file within the caps); one line names a line that is not UTF-8."""
    path = input_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MemeditError(f"cannot read {what} {path}: {e.strerror}") from None
    lines = data.split(b"\n")
    out = []
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MemeditError(f"{path}:{n}: not UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); "
                               "memedit reads text as UTF-8: convert it first (e.g. iconv -t UTF-8)") from None
        if len(line) > MAX_TEXT_CHARS:
            raise MemeditError(f"{path}:{n}: the line has {len(line):,} characters; memedit reads at most "
                               f"{MAX_TEXT_CHARS:,} a line")
        out.append(line.rstrip("\r"))
    return out


def subject_prompt(prompt: str, subject: str, require_placeholder: bool = True) -> str:
    """``prompt`` with "{}" replaced by ``subject``, after checking both are text and that a "{}" gets a non-empty
    subject (an empty one leaves a prompt about no one); with ``require_placeholder`` the prompt must hold "{}"."""
    text(prompt, "the prompt (--prompt)")
    text(subject, "the subject (--subject)")
    if "{}" not in prompt:
        if require_placeholder:
            raise MemeditError(f'the prompt {prompt[:80]!r} has no "{{}}" to put the subject in: write it as '
                               '"{} keeps a pet"')
        return prompt
    if not subject.strip():
        raise MemeditError(f'the prompt {prompt[:80]!r} has "{{}}" for a subject, but the subject is empty: pass '
                           "--subject NAME")
    return prompt.replace("{}", subject)  # not str.format: user prompts may hold other braces
