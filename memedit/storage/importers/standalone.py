"""Standalone memory modules with no host LM: XLM's PKM (2019) and the ``product-key-memory`` PyPI ``PKM`` module.

Both become a :class:`MemoryModel` with ``config.standalone`` set: one memory at "layer" 0, no tokenizer. Their
lookup is the same as the reference's; only names, shapes and the query layout differ
(docs/reference.md §2):

- XLM: ``keys`` (H, 2, N, K/2), ``query_proj.query_mlps.0`` linear (+ optional eval-mode BatchNorm at ``.1``, folded
  into the linear), ``values.weight`` (N², D), no output projection.
- product-key-memory: ``to_queries.weight`` (2·H·d, D) with rows ordered (half, head, d), a LayerNorm(d) on every
  half-query (``norm``), ``keys`` (H, N, 2, d), ``values.weight`` (N², D), no projection.

Neither state dict stores k (slots per head); it defaults to both libraries' default, 32 (capped at N), or ``knn=``.
"""

from __future__ import annotations

import torch

from ...errors import MemeditError
from ...lm.memory import MemoryConfig
from ...lm.model import MemoryModel, ModelConfig
from ..folder import load_state

DEFAULT_KNN = 32  # XLM's mem_knn and product-key-memory's topk defaults


def _prefix(state: dict[str, torch.Tensor], origin: str) -> str:
    """The common prefix of one memory module's names (e.g. "memories.0."), found from its ``keys``."""
    found = [k[: -len("keys")] for k in state if k == "keys" or k.endswith(".keys")]
    if len(found) != 1:
        raise MemeditError(f"{origin}: expected one memory module's state dict, found {len(found)} 'keys' tensors")
    return found[0]


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _standalone(dim: int, mem: MemoryConfig, state: dict[str, torch.Tensor], origin: str, layout: str) -> MemoryModel:
    cfg = ModelConfig(dim=dim, n_layers=1, n_heads=1, vocab_size=-1, standalone=True, memory=mem)
    try:
        model = MemoryModel(cfg)
    except ValueError as e:
        raise MemeditError(f"{origin}: {e}") from None
    load_state(model, {f"layers.0.feed_forward.{k}": v for k, v in state.items()}, origin)
    model.meta["imported_from"] = {"layout": layout, "path": origin}
    return model


def _knn(knn: int | None, n_keys: int) -> int:
    k = min(DEFAULT_KNN, n_keys) if knn is None else int(knn)
    if not 1 <= k <= n_keys:
        raise MemeditError(f"knn {k} must be between 1 and the number of sub-keys {n_keys}")
    return k


def _need(state: dict[str, torch.Tensor], name: str, origin: str) -> torch.Tensor:
    if name not in state:
        raise MemeditError(f"{origin}: missing {name}")
    return state[name]


def load_xlm(state: dict[str, torch.Tensor], origin: str, knn: int | None = None) -> MemoryModel:
    """An XLM ``HashingMemory`` state dict as a standalone model."""
    s = _strip(state, _prefix(state, origin))
    keys = s["keys"]
    if keys.dim() != 4 or keys.shape[1] != 2:
        raise MemeditError(f"{origin}: XLM keys must be (heads, 2, n_keys, k_dim/2), got {tuple(keys.shape)}")
    H, _, N, half = keys.shape
    w = _need(s, "query_proj.query_mlps.0.weight", origin)
    values = _need(s, "values.weight", origin)
    extra = sorted(k for k in s if k.startswith("query_proj.query_mlps.") and k.split(".")[2] not in ("0", "1"))
    if extra:
        raise MemeditError(f"{origin}: a multi-layer query network ({extra[0]}) is not supported")
    if w.dim() != 2 or w.shape[0] != H * 2 * half:
        raise MemeditError(f"{origin}: query_proj.query_mlps.0.weight has shape {tuple(w.shape)}, "
                           f"expected ({H * 2 * half}, dim) for {H} heads of key dim {2 * half}")
    D = w.shape[1]
    if values.dim() != 2 or values.shape != (N * N, D):
        raise MemeditError(f"{origin}: values.weight has shape {tuple(values.shape)}, expected ({N * N}, {D}): "
                           "XLM memories without an output projection need value dim = input dim")
    b = s.get("query_proj.query_mlps.0.bias", torch.zeros(w.shape[0], dtype=w.dtype))
    if "query_proj.query_mlps.1.running_mean" in s:  # eval-mode BatchNorm1d: fold it into the linear
        g, beta = s["query_proj.query_mlps.1.weight"].double(), s["query_proj.query_mlps.1.bias"].double()
        mean = s["query_proj.query_mlps.1.running_mean"].double()
        var = s["query_proj.query_mlps.1.running_var"].double()
        scale = g / torch.sqrt(var + 1e-5)
        w, b = (w.double() * scale[:, None]).to(w.dtype), ((b.double() - mean) * scale + beta).to(b.dtype)
    mem = MemoryConfig(layers=[0], n_keys=N, heads=H, knn=_knn(knn, N), k_dim=2 * half, v_dim=-1,
                       swilu_projection=False, gated=False, share_values=False)
    return _standalone(D, mem, {
        "keys": keys.reshape(2 * H * N, half),
        "values.weight": values,
        "query_proj.query_mlps.0.weight": w,
        "query_proj.query_mlps.0.bias": b,
    }, origin, "xlm")


def load_pkm(state: dict[str, torch.Tensor], origin: str, knn: int | None = None) -> MemoryModel:
    """A ``product_key_memory.PKM`` state dict (LayerNorm queries, sum of values) as a standalone model."""
    s = _strip(state, _prefix(state, origin))
    unsupported = {"pre_layernorm.weight": "pre_layernorm=True", "output_norm.weight": "norm_output=True",
                   "norm.fn.running_mean": "use_layernorm=False", "maybe_concat_combine.2.weight":
                   "concat_values_and_combine=True"}
    for name, option in unsupported.items():
        if name in s:
            raise MemeditError(f"{origin}: a PKM built with {option} is not supported")
    keys = s["keys"]
    if keys.dim() != 4 or keys.shape[2] != 2:
        raise MemeditError(f"{origin}: PKM keys must be (heads, n_keys, 2, dim_head), got {tuple(keys.shape)}")
    H, N, _, d = keys.shape
    w = _need(s, "to_queries.weight", origin)
    values = _need(s, "values.weight", origin)
    if w.dim() != 2 or w.shape[0] != 2 * H * d:
        raise MemeditError(f"{origin}: to_queries.weight has shape {tuple(w.shape)}, expected ({2 * H * d}, dim)")
    D = w.shape[1]
    if values.shape != (N * N, D):
        raise MemeditError(f"{origin}: values.weight has shape {tuple(values.shape)}, expected ({N * N}, {D})")
    mem = MemoryConfig(layers=[0], n_keys=N, heads=H, knn=_knn(knn, N), k_dim=2 * d, v_dim=-1,
                       swilu_projection=False, gated=False, share_values=False, query_norm=True)
    # PKM's query rows are (half, head, d); memedit's are (head, half, d)
    w_hpd = w.view(2, H, d, D).transpose(0, 1).reshape(2 * H * d, D)
    return _standalone(D, mem, {
        "keys": keys.transpose(1, 2).reshape(2 * H * N, d),  # (H, N, 2, d) -> (H, 2, N, d)
        "values.weight": values,
        "query_proj.query_mlps.0.weight": w_hpd,
        "query_proj.query_mlps.0.bias": torch.zeros(2 * H * d, dtype=w.dtype),
        "query_norm.weight": _need(s, "norm.weight", origin),
        "query_norm.bias": _need(s, "norm.bias", origin),
    }, origin, "product-key-memory")
