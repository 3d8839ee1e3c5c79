"""What a native model folder is: its format constants and config, the model's native tensors (and how a state
dict is loaded into a model), where output may be written, and the state files read without the writers' lock
(frozen rows, the edit log of memedit < 0.2).

The modules that change a folder (store.py) and load or save one (checkpoint.py) both build on this one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import MemeditError
from ..lm.model import MemoryModel
from .files import refuse_special

FORMAT = "memedit"
FORMAT_VERSION = 1
BUNDLED = Path(__file__).parents[1] / "data" / "demo"  # memedit/data/demo
ENV_MODEL = "MEMEDIT_MODEL"
STATE_DIR = "memedit"  # per-model state inside a native folder
FROZEN = "frozen.safetensors"
EDITS = "edits.jsonl"
LINK = "link.json"  # a linked folder's base: the checkpoint elsewhere that it maps (storage.linked)
LINK_BLOCKS = "link.blocks"
LINK_FORMAT = "memedit-link"


def is_native(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def is_linked(folder: Path) -> bool:
    """A folder whose base is a linked checkpoint (a native base, once written by compact, takes precedence)."""
    folder = Path(folder)
    return (folder / LINK).is_file() and not (folder / "model.safetensors").exists()


def read_link(folder: Path) -> dict:
    """The parsed ``link.json`` of a linked folder (storage.linked), refused in one line when it is damaged."""
    path = Path(folder) / LINK
    try:
        link = json.loads(path.read_text())
        if link.get("format") != LINK_FORMAT or not isinstance(link.get("files"), dict) or \
                not isinstance(link.get("meta"), dict) or not isinstance(link.get("source"), str):
            raise ValueError("not a memedit link")
    except (OSError, ValueError, AttributeError) as e:
        raise MemeditError(f"{path} is damaged ({e}); run `memedit check --model {folder}`") from None
    if link.get("version", 1) > 1:
        raise MemeditError(f"{path} was written by a newer memedit; upgrade memedit")
    return link


def link_meta(folder: Path) -> dict[str, str]:
    """The base metadata a linked folder keeps in ``link.json`` (as a native base keeps it in its header)."""
    return {str(k): str(v) for k, v in read_link(folder)["meta"].items()}


def native_state(model: MemoryModel, contiguous: bool = True) -> dict[str, torch.Tensor]:
    """The state dict with every shared value table stored once (under its first reading layer)."""
    state = model.state_dict(keep_vars=not contiguous)
    for t in model.tables:
        for name in t.state_names[1:]:
            del state[name]
    return {k: v.contiguous() for k, v in state.items()} if contiguous else state


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


def _damaged(path: Path, what: str) -> MemeditError:
    return MemeditError(f"{path} is damaged ({what}); run `memedit check --model {path.parent.parent}`")


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise _damaged(path, "not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise _damaged(path, str(e)[:160]) from None


def frozen_rows(model: MemoryModel) -> dict[str, torch.Tensor]:
    """{table name: sorted int64 row ids} of the rows nothing may change (empty dict if none)."""
    if model.source is None:
        return {}
    path = Path(model.source) / "memedit" / FROZEN
    if not path.exists():
        return {}
    tensors, _ = _read_tensors(path)
    rows = {t.name: t.n_rows for t in model.tables}
    rows.update({f"keys.layer{L}": layer.keys.shape[0] for L, layer in model.memory_layers.items()})
    for k, v in tensors.items():
        if k not in rows:
            raise _damaged(path, f"{k!r} is neither a value table nor a layer's sub-keys")
        if v.dim() != 1 or v.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise _damaged(path, f"{k} is a {v.dim()}-d {v.dtype} tensor, not a list of row ids")
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= rows[k]):
            raise _damaged(path, f"{k} names rows outside 0..{rows[k] - 1}")
    return {k: v.long() for k, v in tensors.items()}


def legacy_log(path: Path) -> list[dict]:
    """The entries of a v1 edits.jsonl (each checked to be an object with an id)."""
    if not path.is_file():
        return []
    out = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MemeditError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                e = json.loads(line)
            except ValueError:
                raise MemeditError(f"{path}:{n} is not valid JSON; the edit log is damaged") from None
            if not isinstance(e, dict) or not isinstance(e.get("id"), str) or e.get("op") not in ("apply", "revert"):
                raise MemeditError(f"{path}:{n} is not an edit-log entry (it needs an op and an id); the edit log is "
                                   "damaged")
            out.append(e)
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def check_tokenizer(model: MemoryModel, origin: str) -> None:
    """Refuse a tokenizer with more ids than the model's vocabulary (fewer is fine: vocabularies are often padded)."""
    tok, n = model.tokenizer, model.config.vocab_size
    if tok is not None and tok.vocab_size > n:
        raise MemeditError(f"{origin} has {tok.vocab_size} tokens but the model only {n}: wrong tokenizer?")


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


OWN_FILES = ("config.json", "model.safetensors", LINK, LINK_BLOCKS, "tokenizer.json", "memedit/rows.log",
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
