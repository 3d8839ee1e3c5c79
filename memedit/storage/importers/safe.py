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


def read_dcp_metadata(path: Path) -> Any:
    """The ``.metadata`` of a DCP folder, unpickled with only DCP's own metadata classes allowed."""
    f = path / ".metadata"
    try:
        with open(f, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except pickle.UnpicklingError as e:
        raise MemeditError(f"refusing {f}: it names code outside DCP's metadata classes "
                           f"({first_line(e)[:160]})") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise MemeditError(f"{f} is corrupt or truncated ({first_line(e)[:160]})") from None
