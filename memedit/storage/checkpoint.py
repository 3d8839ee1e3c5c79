"""The native model folder, atomic writes, and finding the model a command should use.

A native model folder holds ``config.json``, ``model.safetensors`` (a shared value table stored once), the
tokenizer file, and a ``memedit/`` subfolder for later state (frozen rows, background statistics, edit log).
Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import MemeditError
from ..lm.model import MemoryModel, ModelConfig

FORMAT = "memedit"
FORMAT_VERSION = 1
BUNDLED = Path(__file__).parents[1] / "data" / "demo"  # memedit/data/demo
ENV_MODEL = "MEMEDIT_MODEL"
STATE_DIR = "memedit"  # per-model state inside a native folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- atomic writes ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path, crash: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. ``crash`` names the write point
    for $MEMEDIT_CRASH_AT (store.crash_point: "{crash}-tmp" before the rename, "{crash}-renamed" after it).
    """
    from .store import crash_point

    path = Path(path)
    refuse_special(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise MemeditError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual permissions
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # again: some writers (safetensors) replace the file with 0600
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if crash:
            crash_point(f"{crash}-tmp")
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise MemeditError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if crash:
        crash_point(f"{crash}-renamed")


def refuse_special(path: Path) -> None:
    """Refuse an output path that exists and is not a regular file (a device, a pipe, a socket, a folder): a rename
    would replace the node itself (/dev/null with a regular file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise MemeditError(f"cannot write {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, pipe or socket)"
        raise MemeditError(f"{path} is {kind}; give a regular file or a new path")


@contextlib.contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst`` (which must not exist or be empty); on success it becomes ``dst``."""
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise MemeditError(f"{dst} already exists and is not empty; choose a new folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        _publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_dir(tmp: Path, dst: Path) -> None:
    """fsync every file in ``tmp``, give it the usual permissions, and rename it to ``dst`` (replacing it)."""
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700
    for f in tmp.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ---- resolving --model ----------------------------------------------------------------------------
def resolve_model_path(path: str | Path | None) -> Path:
    """The model a command should use: the given path, else $MEMEDIT_MODEL, else the bundled demo model."""
    if path is None or str(path) == "":
        path = os.environ.get(ENV_MODEL) or BUNDLED
    p = Path(path).expanduser()
    if not p.exists():
        raise MemeditError(f"model path {p} does not exist")
    return p


def is_native(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


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
            from .importers.tokenizers import load_path

            model.tokenizer = load_path(options["tokenizer"])
            check_tokenizer(model, str(options["tokenizer"]))
    else:
        from . import importers

        model = importers.load_foreign(p, **options)
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
    from .shards import is_sharded

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


def read_config(path: Path) -> dict:
    """The parsed config.json of a native folder (a JSON object), refused in one line when it is damaged."""
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MemeditError(f"cannot read {path / 'config.json'}: {e}; run `memedit check --model {path}`") from None
    if not isinstance(meta, dict):
        raise MemeditError(f"{path / 'config.json'} is damaged (a JSON {type(meta).__name__}, not an object); run "
                           f"`memedit check --model {path}`")
    return meta


def load_native(path: str | Path, log: bool = True) -> MemoryModel:
    """Load a native model folder, validating config, names and shapes (with ``log=False``: its base only, without
    the row log's records or the tokenizer, for `memedit check`)."""
    from ..lm.tokenizer import load_tokenizer
    from .linked import LINK, is_linked, open_link
    from .store import map_tensors, open_folder

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


def check_tokenizer(model: MemoryModel, origin: str) -> None:
    """Refuse a tokenizer with more ids than the model's vocabulary (fewer is fine: vocabularies are often padded)."""
    tok, n = model.tokenizer, model.config.vocab_size
    if tok is not None and tok.vocab_size > n:
        raise MemeditError(f"{origin} has {tok.vocab_size} tokens but the model only {n}: wrong tokenizer?")


def native_state(model: MemoryModel, contiguous: bool = True) -> dict[str, torch.Tensor]:
    """The state dict with every shared value table stored once (under its first reading layer)."""
    state = model.state_dict(keep_vars=not contiguous)
    for t in model.tables:
        for name in t.state_names[1:]:
            del state[name]
    return {k: v.contiguous() for k, v in state.items()} if contiguous else state


def load_state(model: MemoryModel, state: dict[str, torch.Tensor], origin: str, copy: bool = True) -> None:
    """Copy ``state`` into ``model`` (or, with ``copy=False``, use its tensors as they are, e.g. mapped from a
    file), naming exactly what is missing, unexpected or mis-shaped."""
    expected = native_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - _shared_copies(model))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise MemeditError(f"{origin} does not match its config: {'; '.join(parts)}")
    params = dict(model.state_dict(keep_vars=True))
    for name in expected:
        src, dst = state[name], params[name]
        if tuple(src.shape) != tuple(dst.shape):
            raise MemeditError(f"{origin}: {name} has shape {tuple(src.shape)}, the config implies {tuple(dst.shape)}")
        if not src.is_floating_point():
            raise MemeditError(f"{origin}: {name} has dtype {src.dtype}, expected a floating-point tensor")
        if dst.is_meta:  # a model built on the meta device takes the (possibly memory-mapped) tensor itself
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr,
                    torch.nn.Parameter(src.clone() if copy else src, requires_grad=False))
            continue
        # each tensor keeps its stored dtype (e.g. bfloat16 values beside float32 keys)
        _set_param(model, name, src.clone() if copy else src)
    _retie_shared(model)


def _set_param(model: MemoryModel, name: str, value: torch.Tensor) -> None:
    """Replace the parameter ``name`` by ``value`` (works on a model built on the meta device)."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = mod._parameters.get(attr)
    if old is not None and old.device.type != "meta" and old.dtype == value.dtype:
        with torch.no_grad():
            old.data = value
    else:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)


def _shared_copies(model: MemoryModel) -> set[str]:
    return {n for t in model.tables for n in t.state_names[1:]}


def _retie_shared(model: MemoryModel) -> None:
    """Assigning ``.data`` keeps module identity, so shared tables stay one module; nothing to re-tie."""
    for t in model.tables:
        for L in t.layers:
            assert model.memory_layers[L].values is t.module


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise MemeditError(f"unsupported dtype {dtype}")


def save(model: MemoryModel, dst: str | Path, overwrite: bool = False, link: bool = False, progress=None) -> Path:
    """Write ``model`` as a native folder at ``dst``, atomically: the folder appears whole or not at all.

    ``link``: the folder's base is the checkpoint the model was loaded from (a DCP step folder), left where it is
    and never written (storage.linked); ``progress(done, total)`` follows the bytes hashed."""
    from .. import __version__
    from .store import write_base

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
            from .store import LOCK, scan_log, upgrade_dir

            shutil.copytree(src_state, tmp / STATE_DIR, ignore=shutil.ignore_patterns(LOCK, ".*.tmp", ".tmp??????"))
            upgrade_dir(tmp / STATE_DIR)
            records = scan_log(tmp / STATE_DIR / "rows.log", with_rows=False)[0]
        if link:
            from .linked import write_link

            write_link(model, tmp, progress)
        else:
            write_base(model, tmp / "model.safetensors", records)  # the model as it is holds every record
        _publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def state_dir(model: MemoryModel, create: bool = False) -> Path:
    """The model's ``memedit/`` state folder; refuses the bundled (read-only) model when ``create``."""
    if create:
        require_writable(model)
    if model.source is None:
        raise MemeditError("this model was not loaded from a folder; save it with `memedit convert` first")
    d = Path(model.source) / STATE_DIR
    if create:
        d.mkdir(exist_ok=True)
    return d


OWN_FILES = ("config.json", "model.safetensors", "link.json", "link.blocks", "tokenizer.json", "memedit/rows.log",
             "memedit/lock", "memedit/frozen.safetensors", "memedit/background.safetensors", "memedit/edits.jsonl")


def check_output(model: MemoryModel | None, out: str | Path) -> Path:
    """``out`` if memedit can write it there without harm, checked before any change is made: never one of the
    model's own files, and its folder must exist (or be creatable) and be writable."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise MemeditError(f"{out} is a folder; give a file name")
    refuse_special(out)
    if model is not None and model.source is not None:
        src = Path(model.source)
        own = {(src / f).resolve() for f in OWN_FILES} | ({src.resolve()} if src.is_file() else set())
        if out.resolve() in own or (src.is_dir() and out.resolve().parent == (src / STATE_DIR).resolve()):
            raise MemeditError(f"{out} is one of the model's own files; write the output somewhere else")
    parent = _existing_parent(out)
    if not _can_create_in(parent):
        raise MemeditError(f"cannot write {out}: {parent} is not a writable folder")
    if out.exists() and not os.access(out, os.W_OK):
        raise MemeditError(f"cannot write {out}: the file is not writable")
    return out


def check_output_folder(model: MemoryModel | None, dst: str | Path, overwrite: bool = False) -> Path:
    """``dst`` if a model folder can be written there, checked before any work: a new path (or an empty folder) in
    a folder memedit can write, and not inside ``model``'s own folder (a model inside another's state is lost).
    ``overwrite``: ``dst`` may be a folder already (it is replaced whole)."""
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise MemeditError(f"{dst} already exists and is not empty; choose a new folder")
    if not overwrite and model is not None and model.source is not None and Path(model.source).is_dir():
        src, where = Path(model.source).resolve(), dst.resolve()
        if where == src or src in where.parents:
            raise MemeditError(f"{dst} is inside the model folder {model.source}; write the new model somewhere else")
    parent = _existing_parent(dst)
    if not _can_create_in(parent):
        raise MemeditError(f"cannot write {dst}: {parent} is not a writable folder")
    return dst


def _existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``, tried for real: permission bits do not tell (root passes every
    access() check, yet cannot create a file in /proc)."""
    if not folder.is_dir():
        return False
    try:
        fd, name = tempfile.mkstemp(prefix=".memedit-probe-", suffix=".tmp", dir=folder)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True


def require_writable(model: MemoryModel) -> None:
    """Refuse to change the bundled model or a model that is not a native folder."""
    if model.read_only:
        raise MemeditError(
            "the bundled demo model is read-only: copy it first with `memedit convert ./my-model`, "
            "then pass --model ./my-model"
        )
    if model.source is None or not is_native(Path(model.source)):
        raise MemeditError(f"{model.source} is not a native memedit folder: `memedit convert DST --model "
                           f"{model.source}` first")


def fingerprint(model: MemoryModel) -> str:
    """16 hex digits identifying the config and every tensor's bytes (a shared table once).

    A hash of the per-tensor sums of block hashes (store.block_hash_sum), so the store keeps it up to date at the
    cost of the rows a write changes, and a tensor changed in memory is re-hashed (noticed by its version counter)."""
    from .store import fingerprint_of, tensor_sums

    return fingerprint_of(model.config.to_dict(), tensor_sums(model))


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
