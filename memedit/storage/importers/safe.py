"""Reading untrusted checkpoint files without running their code: tensors-only torch.load and a DCP metadata reader."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...errors import MemeditError


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors are often many lines long)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure turned into a one-line MemeditError.

    ``mmap``: map the tensors of a zipfile checkpoint (torch >= 1.6) instead of reading them (private, copy-on-write
    pages: nothing is read until used, and nothing written reaches the file); older files are read whole.
    """
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler refused a global: the file wants to build objects (or run code)
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:  # a damaged pickle rather than a refused one
            raise MemeditError(f"{path} is corrupt or truncated ({first_line(e)[:160]})") from None
        what = f"it names {found.group(1)}"
        raise MemeditError(
            f"refusing {path}: it holds pickled objects other than tensors, which could run code ({what}); "
            "memedit loads only tensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as e:
        raise MemeditError(f"{path} is corrupt or truncated ({first_line(e)[:160]})") from None


# What a DCP ``.metadata`` pickle may name: the metadata dataclasses and a few torch and pathlib basics.
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class _Light:
    """A stand-in for one of DCP's metadata classes: its pickled state as attributes, nothing else (importing
    torch.distributed.checkpoint costs seconds, and mapping tensors needs only the metadata's fields)."""

    def __init__(self, *args):
        self.args = args  # an enum's value (_MEM_FORMAT_ENCODING)

    def __setstate__(self, state: Any) -> None:
        if type(self).__name__ == "TensorProperties" and isinstance(state, tuple):
            state = dict(zip(("dtype", "layout", "requires_grad", "memory_format", "pin_memory"), state, strict=False))
        elif isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None  # a field an older writer left out (e.g. _StorageInfo.transform_descriptors)


_LIGHT: dict[str, type] = {}


class _LightUnpickler(_MetadataUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") and (
                module == "torch.distributed.checkpoint.metadata" or (module, name) in _DCP_GLOBALS):
            return _LIGHT.setdefault(name, type(name, (_Light,), {}))
        return super().find_class(module, name)


def read_dcp_metadata(path: Path, light: bool = False) -> Any:
    """The ``.metadata`` of a DCP folder, unpickled with only DCP's own metadata classes allowed.

    ``light``: DCP's classes are replaced by plain stand-ins with the same fields (no import of
    torch.distributed.checkpoint); DCP's own reader needs the real ones."""
    f = path / ".metadata"
    try:
        with open(f, "rb") as fh:
            return (_LightUnpickler if light else _MetadataUnpickler)(fh).load()
    except pickle.UnpicklingError as e:
        raise MemeditError(f"refusing {f}: it names code outside DCP's metadata classes "
                           f"({first_line(e)[:160]})") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise MemeditError(f"{f} is corrupt or truncated ({first_line(e)[:160]})") from None
