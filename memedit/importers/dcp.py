"""Reading the model tensors of a DCP training step folder (torch.distributed.checkpoint) in one process."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import MemeditError
from .safe import first_line, read_dcp_metadata


def is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def load_dcp_model(path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The tensors under ``model`` of a DCP folder: {name without prefix: tensor}, in their stored dtypes.

    Reads only the model part (the optimizer state is left on disk). The metadata pickle is read with an
    allow-list; the shards are tensors read by DCP with ``torch.load(weights_only=True)``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_dcp_metadata(path)

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # noqa: ANN201 - DCP's own signature
            return meta

    state: dict[str, torch.Tensor] = {}
    try:
        entries = meta.state_dict_metadata.items()
    except AttributeError:
        raise MemeditError(f"{path / '.metadata'} is not DCP metadata") from None
    for fqn, md in entries:
        if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata):
            state[fqn[len(prefix):]] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    if not state:
        raise MemeditError(f"{path} is a DCP checkpoint without model tensors (no names under {prefix!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            dcp.load({prefix.rstrip("."): state}, storage_reader=SafeReader(path), no_dist=True)
    except MemeditError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps shard errors in CheckpointException (a BaseException)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = lines[-1] if isinstance(e, CheckpointException) and lines else first_line(e)
        raise MemeditError(f"{path}: cannot read the DCP shards ({why[:200]})") from None
    return state
