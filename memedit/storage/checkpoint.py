"""The native model folder, loading and saving it, and finding the model a command should use.

A native model folder holds ``config.json``, ``model.safetensors`` (a shared value table stored once), the
tokenizer file, and a ``memedit/`` subfolder for later state (frozen rows, background statistics, edit log).
Every write goes through files.py (a temporary file in the same folder, fsynced, renamed over the target).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import MemeditError
from ..lm.model import MemoryModel, ModelConfig
from ..version import __version__
from .files import (  # noqa: F401 (atomic_*: re-exported, the names callers have always used)
    _publish_dir,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    refuse_special,
)
from .folder import (  # noqa: F401 (re-exported: the names callers have always used)
    BUNDLED,
    DTYPES,
    ENV_MODEL,
    FORMAT,
    FORMAT_VERSION,
    OWN_FILES,
    STATE_DIR,
    check_output,
    check_output_folder,
    check_tokenizer,
    dtype_name,
    is_native,
    load_state,
    native_state,
    read_config,
    require_writable,
    state_dir,
)
from .importers import load_foreign
from .importers.tokenizers import load_path, load_tokenizer
from .linked import LINK, is_linked, open_link, write_link
from .shards import is_sharded
from .store import LOCK, fingerprint, map_tensors, open_folder, scan_log, upgrade_dir, write_base  # noqa: F401


# ---- resolving --model ----------------------------------------------------------------------------
def resolve_model_path(path: str | Path | None) -> Path:
    """The model a command should use: the given path, else $MEMEDIT_MODEL, else the bundled demo model."""
    if path is None or str(path) == "":
        path = os.environ.get(ENV_MODEL) or BUNDLED
    p = Path(path).expanduser()
    if not p.exists():
        raise MemeditError(f"model path {p} does not exist")
    return p


def load(path: str | Path | None = None, dtype: str | None = None, device: str | None = None,
         **options) -> MemoryModel:
    """Load a model: a native folder, the bundled demo model (default), or a layout an importer knows.

    ``device``: the torch device to put it on ("cpu", the default, "cuda", "cuda:1", ...).

    Options: ``tokenizer`` (a tokenizer file to use instead of the model's own), ``knn`` (slots per head of a
    standalone XLM / product-key-memory module, which its state dict does not store).
    """
    p = resolve_model_path(path)
    if p.is_dir() and (p / "config.json").is_file():
        read_config(p)  # a damaged config.json: one line naming it, whatever the folder's layout
    if p.is_dir() and is_native(p):
        model = load_native(p)
        if options.get("tokenizer"):
            model.tokenizer = load_path(options["tokenizer"])
            check_tokenizer(model, str(options["tokenizer"]))
    else:
        model = load_foreign(p, **options)
    if dtype is not None:
        if dtype not in DTYPES:
            raise MemeditError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        plain_tables(model, f"--dtype {dtype}")
        model.to(DTYPES[dtype])
    if device is not None and check_device(device).type != "cpu":
        plain_tables(model, f"--device {device}")
        model.to(check_device(device))
    model.eval()
    model.requires_grad_(False)
    return model


def plain_tables(model: MemoryModel, why: str) -> None:
    """Replace value tables mapped from shards (storage.shards.ShardedRows) by ordinary tensors before the model is
    converted as a whole: a copy of a small table; a table too large to copy is refused in one line."""
    for t in model.tables:
        if is_sharded(t.weight):
            t.module.weight = torch.nn.Parameter(t.weight.materialize(why), requires_grad=False)


def check_device(device: str) -> torch.device:
    """The torch device called ``device``, refused with a one-line error when it is not there."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise MemeditError(f"unknown device {device!r} (use cpu, cuda, cuda:1 ...)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise MemeditError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise MemeditError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    if d.type not in ("cpu", "cuda"):
        raise MemeditError(f"device {device!r} is not supported (use cpu or cuda)")
    if d.type == "cpu" and d.index not in (None, 0):
        raise MemeditError(f"device {device!r}: there is one CPU device (cpu, or cpu:0)")
    return d


def load_native(path: str | Path, log: bool = True) -> MemoryModel:
    """Load a native model folder, validating config, names and shapes (with ``log=False``: its base only, without
    the row log's records or the tokenizer, for `memedit check`)."""
    path = Path(path)
    meta = read_config(path)
    if not isinstance(meta.get("format_version", 0), int) or meta.get("format_version", 0) > FORMAT_VERSION:
        raise MemeditError(f"{path} was written by a newer memedit (format {meta['format_version']}); upgrade memedit")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, AttributeError) as e:
        raise MemeditError(f"{path / 'config.json'}: invalid model config ({e})") from None
    check_config(cfg, path / "config.json")
    try:
        with torch.device("meta"), _no_init():  # the tensors come from the mapped base: allocate nothing here
            model = MemoryModel(cfg)
    except ValueError as e:
        raise MemeditError(f"{path / 'config.json'}: {e}") from None
    weights = path / "model.safetensors"
    linked = is_linked(path)  # the base is a checkpoint elsewhere, mapped where it is (storage.linked)
    if not weights.is_file() and not linked:
        raise MemeditError(f"{path} has no model.safetensors")
    if not isinstance(meta.get("dtype", "float32"), str) or meta.get("dtype", "float32") not in DTYPES:
        raise MemeditError(f"{path / 'config.json'}: unknown dtype {meta.get('dtype')!r}")
    try:
        state, base_meta = open_link(path, model) if linked else map_tensors(weights)
        load_state(model, state, str(path / LINK if linked else weights), copy=False)
    except MemeditError as e:  # a damaged base: say where to go next
        raise MemeditError(f"{e}; run `memedit check --model {path}`") from None
    model.source = str(path)
    model.read_only = path.resolve() == BUNDLED.resolve()
    if not log:
        return model
    open_folder(model, path, state, base_meta)
    tok_name = meta.get("tokenizer", "tokenizer.json")
    tok = path / str(tok_name)
    if tok_name is not None and (not isinstance(tok_name, str) or Path(tok_name).is_absolute() or
                                 not tok.resolve().is_relative_to(path.resolve())):
        raise MemeditError(f"{path / 'config.json'}: the tokenizer path {tok_name!r} leaves the model folder; give a "
                           "file name inside it")
    if tok_name is not None and tok.exists() and not tok.is_file():
        raise MemeditError(f"{tok} is not a file; run `memedit check --model {path}`")
    model.tokenizer = load_tokenizer(tok) if tok_name is not None and tok.is_file() else None
    check_tokenizer(model, str(tok))
    model.meta = dict(meta["meta"]) if isinstance(meta.get("meta"), dict) else {}
    return model


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip torch's random initialisation while a model is built whose tensors will be replaced (on the meta device
    it would still import and run torch's reference decompositions: seconds per command)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_", "xavier_uniform_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def save(model: MemoryModel, dst: str | Path, overwrite: bool = False, link: bool = False, progress=None) -> Path:
    """Write ``model`` as a native folder at ``dst``, atomically: the folder appears whole or not at all.

    ``link``: the folder's base is the checkpoint the model was loaded from (a DCP step folder), left where it is
    and never written (storage.linked); ``progress(done, total)`` follows the bytes hashed."""
    dst = check_output_folder(model, dst, overwrite)
    if dst.exists() and BUNDLED.resolve() == dst.resolve():
        raise MemeditError("the bundled demo model is read-only")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "memedit_version": __version__,
            "dtype": dtype_name(model.dtype),
            "model": model.config.to_dict(),
            "tokenizer": "tokenizer.json" if model.tokenizer is not None else None,
            "meta": model.meta,
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if model.tokenizer is not None:
            if not hasattr(model.tokenizer, "save"):
                raise MemeditError(f"cannot save a {type(model.tokenizer).__name__} tokenizer")
            model.tokenizer.save(tmp / "tokenizer.json")
        src_state = Path(model.source) / STATE_DIR if model.source else None
        records = []
        if src_state is not None and src_state.is_dir():
            shutil.copytree(src_state, tmp / STATE_DIR, ignore=shutil.ignore_patterns(LOCK, ".*.tmp", ".tmp??????"))
            upgrade_dir(tmp / STATE_DIR)
            records = scan_log(tmp / STATE_DIR / "rows.log", with_rows=False)[0]
        if link:
            write_link(model, tmp, progress)
        else:
            write_base(model, tmp / "model.safetensors", records)  # the model as it is holds every record
        _publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


MAX_ALLOC = 1 << 40  # bytes: a config implying more than this is damage or a typo, not a model


def check_config(cfg: ModelConfig, origin: Path) -> None:
    """Range-check config values before anything is allocated (a vocab_size of 1e9 must be one line, not 512 GB)."""
    mem = cfg.memory
    ints = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "max_seqlen": cfg.max_seqlen}
    if not cfg.standalone:
        ints["vocab_size"] = cfg.vocab_size
    if mem.layers:
        ints.update({"memory.n_keys": mem.n_keys, "memory.heads": mem.heads, "memory.knn": mem.knn,
                     "memory.k_dim": mem.k_dim})
    for k, v in ints.items():
        if not isinstance(v, int) or not 1 <= v <= 1 << 31:
            raise MemeditError(f"{origin}: {k} = {v!r} is out of range (1..2^31)")
    floats = {"norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "ffn_dim_multiplier": cfg.ffn_dim_multiplier}
    for k, v in floats.items():
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v < 1e30):
            raise MemeditError(f"{origin}: {k} = {v!r} must be a finite positive number")
    v_dim = cfg.dim if mem.v_dim in (-1, None) else mem.v_dim
    total = (2 * max(cfg.vocab_size, 0) * cfg.dim + cfg.n_layers * 12 * cfg.dim * cfg.dim) * 4
    if mem.layers:
        total += (mem.n_keys ** 2) * v_dim * 2 * (1 if mem.share_values else len(mem.layers))
    if total > MAX_ALLOC:
        raise MemeditError(f"{origin}: the config implies {total / 2**40:.0f} TiB of weights; a value is wrong "
                           "(e.g. vocab_size or n_keys)")
