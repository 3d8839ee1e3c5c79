"""The reference implementation's checkpoints (the lingua-based ``memory`` repository), both ways.

In: a consolidated folder (``params.json`` + ``consolidated.pth`` = ``{"model": {...}, "optim": {...}}``) or a
training step folder with DCP shards and ``params.json``. Out: ``save_lingua`` writes a consolidated folder with the
shared value table copied under every memory layer, as the reference expects (docs/reference.md §2).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...errors import MemeditError
from ...lm.memory import MemoryConfig
from ...lm.model import MemoryModel, ModelConfig, meta_model
from ..files import atomic_dir
from ..folder import check_output_folder, check_tokenizer, load_state
from .dcp import DcpState
from .safe import torch_load
from .tokenizers import load_path

# params.json "model" fields memedit uses, with the reference's defaults (None: required)
MODEL_FIELDS: dict[str, Any] = {
    "dim": None, "n_layers": None, "vocab_size": None, "n_heads": None, "head_dim": None, "n_kv_heads": None,
    "ffn_dim_multiplier": None, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seqlen": 1024,
}
# fields that only matter for training (initialisation, seeds, kernels): read and ignored
TRAINING_ONLY = {"init_base_std", "init_std_factor", "seed", "attn_impl", "mask"}
# productkey_args fields -> MemoryConfig fields
PK_FIELDS = {
    "layers": "layers", "mem_n_keys": "n_keys", "mem_heads": "heads", "mem_knn": "knn", "mem_k_dim": "k_dim",
    "mem_v_dim": "v_dim", "swilu_projection": "swilu_projection", "mem_gated": "gated",
    "mem_share_values": "share_values", "peer_variant": "peer_variant",
}
PK_DEFAULTS = {"layers": "", "mem_n_keys": 1024, "mem_heads": 4, "mem_knn": 32, "mem_k_dim": 512, "mem_v_dim": -1,
               "swilu_projection": True, "mem_gated": False, "mem_share_values": True, "peer_variant": False}
PK_TRAINING_ONLY = {"is_enabled", "value_fixed_lr"}
MODEL_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ---- params.json -> config ----------------------------------------------------------------------
def read_params(path: Path) -> dict:
    try:
        params = json.loads(path.read_text())
    except OSError as e:
        raise MemeditError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise MemeditError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(params, dict) or not isinstance(params.get("model"), dict):
        raise MemeditError(f"{path} has no \"model\" section: is this the reference's params.json?")
    return params


def config_from_params(params: dict, origin: str) -> ModelConfig:
    """The ModelConfig described by a reference ``params.json``; names the field that is missing or unknown."""
    m = dict(params["model"])
    pk = m.pop("productkey_args", None) or {}
    for name in ("sliding_window",):
        if m.pop(name, None) is not None:
            raise MemeditError(f"{origin}: model.{name} is set; memedit's host model has no {name}")
    if m.pop("weight_tying", False):
        raise MemeditError(f"{origin}: model.weight_tying is true; the reference host never ties output weights")
    unknown = sorted(set(m) - set(MODEL_FIELDS) - TRAINING_ONLY)
    if unknown:
        raise MemeditError(f"{origin}: unknown field model.{unknown[0]} (memedit knows {', '.join(MODEL_FIELDS)})")
    fields = {k: m.get(k, d) for k, d in MODEL_FIELDS.items()}
    for k in ("dim", "n_layers", "vocab_size"):
        if fields[k] is None or (k == "vocab_size" and fields[k] <= 0):
            raise MemeditError(f"{origin}: missing field model.{k}")
    if fields["n_heads"] is None:
        if fields["head_dim"] is None:
            raise MemeditError(f"{origin}: missing field model.n_heads (or model.head_dim)")
        fields["n_heads"] = fields["dim"] // fields["head_dim"]
    return ModelConfig(**fields, memory=memory_config(pk, fields["n_layers"], origin))


def memory_config(pk: dict, n_layers: int, origin: str) -> MemoryConfig:
    if not isinstance(pk, dict):
        raise MemeditError(f"{origin}: model.productkey_args must be an object")
    unknown = sorted(set(pk) - set(PK_FIELDS) - PK_TRAINING_ONLY)
    if unknown:
        raise MemeditError(f"{origin}: unknown field model.productkey_args.{unknown[0]}")
    args = {**PK_DEFAULTS, **{k: v for k, v in pk.items() if k in PK_FIELDS}}
    layers = args["layers"]
    if pk.get("is_enabled") is False:
        layers = []
    elif isinstance(layers, str):
        try:
            layers = [int(x) for x in layers.replace(" ", "").split(",") if x]
        except ValueError:
            raise MemeditError(f"{origin}: model.productkey_args.layers {args['layers']!r} is not a list of "
                               "layer indices like \"4,12,20\"") from None
    if not all(isinstance(L, int) and 0 <= L < n_layers for L in layers):
        raise MemeditError(f"{origin}: model.productkey_args.layers {layers} are not all in 0..{n_layers - 1}")
    if args["peer_variant"]:
        raise MemeditError(f"{origin}: model.productkey_args.peer_variant is true; memedit does not support PEER yet")
    if args["mem_knn"] > args["mem_n_keys"]:
        raise MemeditError(f"{origin}: mem_knn {args['mem_knn']} > mem_n_keys {args['mem_n_keys']}")
    return MemoryConfig(**{PK_FIELDS[k]: v for k, v in args.items() if k != "layers"}, layers=layers)


def params_from_config(model: MemoryModel) -> dict:
    """A reference ``params.json`` for ``model``: its original one when it came from there, else a new one."""
    cfg, mem = model.config, model.config.memory
    params = copy.deepcopy(model.meta.get("lingua_params")) or {}
    m = params.setdefault("model", {})
    for k in MODEL_FIELDS:
        m[k] = getattr(cfg, k)
    pk = m.setdefault("productkey_args", {})
    pk["is_enabled"] = bool(mem.layers)
    for k, f in PK_FIELDS.items():
        pk[k] = getattr(mem, f)
    pk["layers"] = ",".join(map(str, mem.layers))
    params.setdefault("distributed", {}).setdefault("model_dtype", _dtype_key(model.dtype))
    return params


def _dtype_key(dtype: torch.dtype) -> str:
    return {v: k for k, v in MODEL_DTYPES.items()}.get(dtype, "fp32")


# ---- state dict -> model ------------------------------------------------------------------------
COMPARE_BYTES = 64 << 20  # rows of two shared-table copies compared at a time


def same_blocks(a: torch.Tensor, b: torch.Tensor, block_bytes: int = COMPARE_BYTES) -> bool:
    """Whether two tensors are bit-identical, compared a block of rows at a time.

    Mapped copies are paged in a block at a time and can leave the page cache again: comparing two 2 GiB copies
    never holds either whole.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dim() == 0 or a.numel() == 0:
        return torch.equal(a, b)
    rows = max(1, block_bytes // max(1, a[0].numel() * a.element_size()))
    return all(torch.equal(a[r : r + rows], b[r : r + rows]) for r in range(0, a.shape[0], rows))


def model_from_state(cfg: ModelConfig, state: Mapping[str, torch.Tensor], origin: str) -> MemoryModel:
    """Build the model and load ``state``; shared value copies must be bit-identical and become ONE table.

    ``state`` may be lazy (a mapping that reads a tensor when asked,
    :class:`~memedit.storage.importers.dcp.DcpState`) and
    its tensors memory-mapped: the model is built on the meta device and takes the given tensors as they are (no
    copy), each copy of a shared table is read once, compared blockwise with the first, and dropped. Meta tensors
    in ``state`` (headers only, for ``memedit info``) skip the comparison.
    """
    names = [k for k in state if not k.endswith("rope.freqs_cis")]  # a buffer, if ever saved
    mem = cfg.memory
    loaded: dict[str, torch.Tensor] = {}  # each tensor asked for once: a lazy state reads it again when asked again
    copies: list[str] = []
    if mem.share_values and len(mem.layers) > 1:
        present = [n for n in (f"layers.{L}.feed_forward.values.weight" for L in mem.layers) if n in state]
        copies = present[1:]
        if present:
            first = loaded[present[0]] = state[present[0]]
        for n in copies:
            copy = state[n]
            if not (first.is_meta or copy.is_meta) and not same_blocks(first, copy):
                raise MemeditError(
                    f"{origin}: the shared value table differs between {present[0]} and {n} (mem_share_values "
                    "is true, so every copy must be identical); the checkpoint is inconsistent"
                )
            del copy
    try:
        model = meta_model(cfg)  # no memory for weights that load_state replaces with the stored tensors
    except ValueError as e:
        raise MemeditError(f"{origin}: {e}") from None
    for n in names:
        if n not in copies and n not in loaded:
            loaded[n] = state[n]
    load_state(model, loaded, origin, copy=not getattr(state, "mapped", False))  # mapped: copy-on-write already
    return model


def tokenizer_from_params(params: dict, folder: Path):
    """The tokenizer ``data.tokenizer`` names, found as given, beside the checkpoint, or by file name there."""
    spec = (params.get("data") or {}).get("tokenizer")
    if not spec:
        return None, "params.json names no tokenizer"
    name, path = spec.get("name"), spec.get("path")
    if name == "bytes":
        return load_path("", "bytes"), None
    if name not in ("sp", "tiktoken", "memedit"):
        return None, f"unknown tokenizer kind {name!r} in params.json"
    candidates = [Path(path)] if path else []
    if path:
        candidates += [folder / path, folder / Path(path).name, folder.parent / Path(path).name]
    for c in candidates:
        if c.is_file():
            return load_path(c, None if name == "memedit" else name), None
    return None, f"tokenizer file {path!r} from params.json not found"


def load_lingua(folder: Path, params_path: Path, state: Mapping[str, torch.Tensor], origin: str,
                tokenizer: str | None) -> MemoryModel:
    """Assemble an imported reference model: config, weights, tokenizer, and the facts needed to write it back."""
    params = read_params(params_path)
    cfg = config_from_params(params, str(params_path))
    model = model_from_state(cfg, state, origin)
    if tokenizer:
        model.tokenizer = load_path(tokenizer)
    else:
        model.tokenizer, why = tokenizer_from_params(params, folder)
        if why:
            model.meta["tokenizer_missing"] = why
    check_tokenizer(model, tokenizer or "the tokenizer named in params.json")
    model.meta["lingua_params"] = params
    model.meta["imported_from"] = {"layout": "lingua", "path": str(folder)}
    return model


def load_consolidated(pth: Path, tokenizer: str | None = None, header_only: bool = False) -> MemoryModel:
    """A consolidated checkpoint: ``consolidated.pth`` with ``params.json`` beside it (or one folder up).

    The file is memory-mapped (a zipfile checkpoint; older ones are read whole), so tensors are read when used.
    ``header_only``: the model's tensors are meta tensors of the stored shapes and dtypes (for ``memedit info``).
    """
    params = next((p for p in (pth.parent / "params.json", pth.parent.parent / "params.json") if p.is_file()), None)
    if params is None:
        raise MemeditError(f"{pth.parent} has no params.json: the reference writes it beside consolidated.pth")
    ckpt = torch_load(pth, mmap=True)
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MemeditError(f"{pth} is not a consolidated checkpoint (expected {{'model': {{name: tensor}}, ...}})")
    if header_only:
        state = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
    return load_lingua(pth.parent, params, state, str(pth), tokenizer)


def load_step_folder(folder: Path, tokenizer: str | None = None, header_only: bool = False) -> MemoryModel:
    """A training step folder: DCP shards and ``params.json``, read directly (no consolidation needed), a tensor
    at a time. ``header_only``: meta tensors from the DCP metadata (for ``memedit info``)."""
    params = folder / "params.json"
    if not params.is_file():
        raise MemeditError(f"{folder} has DCP shards but no params.json: copy the run's params.json into it")
    state = DcpState(folder)
    return load_lingua(folder, params, state.meta() if header_only else state, str(folder), tokenizer)


# ---- model -> consolidated folder ----------------------------------------------------------------
def save_lingua(model: MemoryModel, dst: str | Path) -> Path:
    """Write ``model`` as the reference's consolidated folder: ``params.json`` + ``consolidated.pth``.

    Every memory layer gets its own copy of a shared value table (the reference's layout); tensors keep their dtypes.
    """
    check_output_folder(model, dst)
    if model.config.standalone:
        raise MemeditError("a standalone memory module has no host LM to write in the reference layout; "
                           "use --format native")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # one storage per name
    params = params_from_config(model)
    savable = model.tokenizer is not None and hasattr(model.tokenizer, "save")
    if savable and not (params.get("data") or {}).get("tokenizer"):
        params.setdefault("data", {})["tokenizer"] = {"name": "memedit", "path": "tokenizer.json"}
    with atomic_dir(dst) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        torch.save({"model": state, "optim": {}}, tmp / "consolidated.pth")
        if savable:
            model.tokenizer.save(tmp / "tokenizer.json")  # memedit can read it back with --tokenizer
    return Path(dst)
