"""A structured description of a loaded model (what `memedit info` prints)."""

from __future__ import annotations

from ..lm.model import MemoryModel
from .checkpoint import dtype_name


def describe(model: MemoryModel) -> dict:
    cfg, mem = model.config, model.config.memory
    memory = set(mem.layers)
    tok = model.tokenizer
    return {
        "source": model.source,
        "read_only": model.read_only,
        "dtype": dtype_name(model.dtype),
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "standalone": cfg.standalone,  # a lone memory module (XLM / product-key-memory): no host LM, no tokenizer
        "vocab_size": cfg.vocab_size,
        "layers": [{"layer": L, "kind": "memory" if L in memory else "dense"} for L in range(cfg.n_layers)],
        "memory_layers": list(mem.layers),
        "n_keys": mem.n_keys,
        "heads": mem.heads,
        "knn": mem.knn,
        "k_dim": mem.k_dim,
        "v_dim": cfg.dim if mem.v_dim in (-1, None) else mem.v_dim,
        "n_slots": mem.n_slots,
        "swilu_projection": mem.swilu_projection,
        "gated": mem.gated,
        "share_values": mem.share_values,
        "tables": [
            {"name": t.name, "layers": t.layers, "rows": t.n_rows, "dim": t.weight.shape[1],
             "dtype": dtype_name(t.weight.dtype)}
            for t in model.tables
        ],
        "params": model.param_counts(),
        "tokenizer": None if tok is None else {"type": type(tok).__name__, "vocab_size": tok.vocab_size},
    }
