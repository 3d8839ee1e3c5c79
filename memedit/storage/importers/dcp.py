"""Reading the model tensors of a DCP training step folder (torch.distributed.checkpoint) in one process."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ...errors import MemeditError
from ..shards import map_tensor
from .safe import first_line, read_dcp_metadata


def is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


class DcpState(Mapping):
    """The tensors under ``model`` of a DCP folder as a lazy mapping: {name without prefix: tensor}.

    Names, shapes and dtypes come from the metadata; a tensor is mapped from the shards (``mapped``: its bytes inside
    the ``.distcp`` file, copy-on-write; a value table saved in row chunks as a ``ShardedRows``) or else read (in its
    stored dtype) when it is asked for, and not kept, so a caller that handles one tensor at a time holds one at a
    time. Only the model part is read (the optimizer state is left on disk). The metadata pickle is read with an
    allow-list; the shards are tensors read by DCP with ``torch.load(weights_only=True)``.
    """

    mapped = True  # tensors are mapped from the shards where they can be (memedit.storage.shards)

    def __init__(self, path: Path, prefix: str = "model.", mapped: bool = True):
        self.path, self.prefix, self.mapped = Path(path), prefix, mapped
        self._files: dict = {}  # the shard files mapped for this state (memedit.storage.shards)
        self.metadata = read_dcp_metadata(self.path, light=mapped)  # mapping needs no import of DCP itself
        try:
            entries = self.metadata.state_dict_metadata.items()
            self.specs = {fqn[len(prefix):]: (tuple(md.size), md.properties.dtype) for fqn, md in entries
                          if fqn.startswith(prefix) and type(md).__name__ == "TensorStorageMetadata"}
        except (AttributeError, TypeError):
            raise MemeditError(f"{self.path / '.metadata'} is not DCP metadata") from None
        if not all(isinstance(dt, torch.dtype) for _, dt in self.specs.values()):
            raise MemeditError(f"{self.path / '.metadata'} is not DCP metadata (a tensor without a dtype)")
        if not self.specs:
            raise MemeditError(f"{self.path} is a DCP checkpoint without model tensors (no names under {prefix!r})")

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def meta(self) -> dict[str, torch.Tensor]:
        """Meta tensors of every stored shape and dtype (nothing read from the shards)."""
        return {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in self.specs.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.mapped:  # the tensor bytes mapped inside the shards, no copy (value tables by rows)
            return map_tensor(self.path, self.metadata, self.prefix + name, rows_table=name.endswith("values.weight"),
                              files=self._files)
        shape, dtype = self.specs[name]
        out = torch.empty(shape, dtype=dtype)
        self.read({name: out})
        return out

    def read(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill ``tensors`` ({name: preallocated tensor}) from the shards."""
        # torch.distributed.checkpoint takes ~1 s to import: only a DCP folder pays it
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # lazy: ~1 s to import (see above)

        meta = self.metadata if not self.mapped else read_dcp_metadata(self.path)  # DCP needs its own classes

        class SafeReader(dcp.FileSystemReader):
            def read_metadata(self, *args, **kwargs):  # noqa: ANN201 - DCP's own signature
                return meta

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
                dcp.load({self.prefix.rstrip("."): tensors}, storage_reader=SafeReader(self.path), no_dist=True)
        except MemeditError:
            raise
        except (Exception, CheckpointException) as e:  # DCP wraps shard errors in CheckpointException (BaseException)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = lines[-1] if isinstance(e, CheckpointException) and lines else first_line(e)
            raise MemeditError(f"{self.path}: cannot read the DCP shards ({why[:200]})") from None


def load_dcp_model(path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor under ``model`` of a DCP folder, read in one pass: {name without prefix: tensor}."""
    state = DcpState(path, prefix)
    out = {k: torch.empty(shape, dtype=dt) for k, (shape, dt) in state.specs.items()}
    state.read(out)
    return out
