"""Importers for checkpoint layouts that users bring (the reference implementation, XLM PKM, product-key-memory).

``load_foreign`` looks at the path and picks one:

- a folder (or file) with ``consolidated.pth`` and ``params.json``: the reference's consolidated checkpoint;
- a folder with DCP shards (``.metadata``, ``*.distcp``) and ``params.json``: a reference training step folder;
- a ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict of one memory module: XLM (4-D keys (H, 2, N, K/2)) or
  product-key-memory (``to_queries.weight``, keys (H, N, 2, d)).

Everything is read without unpickling objects: ``torch.load(weights_only=True)``, safetensors, and DCP with an
allow-listed metadata reader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...errors import MemeditError
from ...lm.model import MemoryModel
from . import lingua
from .dcp import is_dcp
from .safe import torch_load
from .standalone import load_pkm, load_xlm

STATE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def load_foreign(path: Path, tokenizer: str | None = None, knn: int | None = None, header_only: bool = False,
                 **options) -> MemoryModel:
    """Load a checkpoint in a layout other than memedit's native folder (see the module docstring).

    ``header_only``: a reference checkpoint's tensors are meta tensors of the stored shapes and dtypes, read from
    its headers (``memedit info``); a standalone module's state is small and is read.
    """
    if options:
        raise MemeditError(f"unknown load option(s): {', '.join(sorted(options))}")
    path = Path(path)
    if path.is_dir():
        for pth in (path / "consolidated.pth", path / "consolidated" / "consolidated.pth"):
            if pth.is_file():
                model = lingua.load_consolidated(pth, tokenizer, header_only)
                break
        else:
            if is_dcp(path):
                model = lingua.load_step_folder(path, tokenizer, header_only)
            elif (path / "config.json").is_file():
                raise MemeditError(f"{path}/config.json is not a memedit config (no \"format\": \"memedit\")")
            elif (path / "params.json").is_file():
                raise MemeditError(f"{path} has params.json but neither consolidated.pth nor DCP shards (.metadata)")
            else:
                raise MemeditError(f"{path} is not a model folder memedit knows (no config.json, params.json, "
                                   "consolidated.pth or DCP shards)")
    elif path.name == "consolidated.pth" or (path.suffix == ".pth" and (path.parent / "params.json").is_file()):
        model = lingua.load_consolidated(path, tokenizer, header_only)
    elif path.suffix in STATE_SUFFIXES:
        model = load_module_state(path, knn)
        if tokenizer:
            raise MemeditError("a standalone memory module has no host LM, so a tokenizer cannot be used with it")
    else:
        raise MemeditError(f"{path}: unknown checkpoint layout (expected a folder, a .pth or a .safetensors file)")
    model.source = str(path)
    return model


def load_module_state(path: Path, knn: int | None = None) -> MemoryModel:
    """A state dict file holding one standalone memory module (XLM or product-key-memory)."""
    state = _read_state(path)
    if any(k == "to_queries.weight" or k.endswith(".to_queries.weight") for k in state):
        return load_pkm(state, str(path), knn)
    keys = [v for k, v in state.items() if k == "keys" or k.endswith(".keys")]
    if keys and keys[0].dim() == 4:
        return load_xlm(state, str(path), knn)
    if any(k.startswith("layers.") for k in state):
        raise MemeditError(f"{path} looks like a reference model state dict: put params.json beside it "
                           "(a consolidated checkpoint is {'model': state dict} with params.json)")
    raise MemeditError(f"{path}: unknown layout (not an XLM or product-key-memory state dict)")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise MemeditError(f"{path} is corrupt or truncated ({e})") from None
    obj = torch_load(path)
    for wrapper in ("state_dict", "model"):  # common wrappers around a module's state dict
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MemeditError(f"{path} is not a state dict ({{name: tensor}})")
    return obj
