"""Fixtures in the reference implementation's exact checkpoint layout, and an independent re-implementation.

Nothing here uses memedit: the state dicts are built name by name from docs/reference.md §2, and
``reference_forward`` recomputes logits and memory lookups from the RAW state dict in float64 (brute force over all
N² slots, complex-number RoPE, explicit causal softmax), so the importer and memedit's host model are checked
against something they did not write.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

# D 64, 4 layers, attention 4 heads with 2 kv heads (GQA), memory at "1,3": H 4, N 16, K 32, k 8
PARAMS = {
    "name": "fixture",
    "dump_dir": "/checkpoint/fixture",
    "model": {
        "dim": 64, "n_layers": 4, "head_dim": None, "n_heads": 4, "n_kv_heads": 2, "ffn_dim_multiplier": 1.3,
        "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 500000.0, "init_base_std": None,
        "init_std_factor": "disabled", "max_seqlen": 64, "seed": 42, "vocab_size": 258, "weight_tying": False,
        "sliding_window": None,
        "productkey_args": {
            "is_enabled": True, "layers": "1,3", "mem_n_keys": 16, "mem_heads": 4, "mem_knn": 8,
            "mem_share_values": True, "mem_k_dim": 32, "mem_v_dim": -1, "swilu_projection": True,
            "value_fixed_lr": 0.001, "mem_gated": False, "peer_variant": False,
        },
    },
    "distributed": {"model_dtype": "bf16", "fsdp_type": "full_shard"},
    "data": {"tokenizer": {"name": "bytes", "path": None}},
}


def params(vocab_size: int | None = None, **pk) -> dict:
    """The fixture's params.json, with productkey_args overridden (and the vocabulary padded, if given)."""
    p = json.loads(json.dumps(PARAMS))
    p["model"]["productkey_args"].update(pk)
    if vocab_size is not None:
        p["model"]["vocab_size"] = vocab_size
    return p


def ffn_hidden(m: dict) -> int:
    h = int(2 * 4 * m["dim"] / 3)
    if m["ffn_dim_multiplier"] is not None:
        h = int(m["ffn_dim_multiplier"] * h)
    return m["multiple_of"] * math.ceil(h / m["multiple_of"])


def reference_state(p: dict, seed: int = 0, values_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A random state dict with the reference's names, shapes and dtypes (shared values copied per layer)."""
    g = torch.Generator().manual_seed(seed)
    m, pk = p["model"], p["model"]["productkey_args"]
    D, V = m["dim"], m["vocab_size"]
    hd = m["head_dim"] or D // m["n_heads"]
    kv = m["n_kv_heads"] or m["n_heads"]
    H, N, K = pk["mem_heads"], pk["mem_n_keys"], pk["mem_k_dim"]
    Vd = D if pk["mem_v_dim"] == -1 else pk["mem_v_dim"]
    mem_layers = [int(x) for x in pk["layers"].split(",")] if pk["is_enabled"] else []

    def rnd(*shape, std=None):
        std = std if std is not None else 1.0 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=g) * std

    def norm_w():
        return 1.0 + 0.1 * torch.randn(D, generator=g)

    s = {"tok_embeddings.weight": rnd(V, D, std=1.0)}
    shared = rnd(N * N, Vd, std=Vd**-0.5).to(values_dtype)
    for L in range(m["n_layers"]):
        a = f"layers.{L}."
        s[a + "attention.wq.weight"] = rnd(m["n_heads"] * hd, D)
        s[a + "attention.wk.weight"] = rnd(kv * hd, D)
        s[a + "attention.wv.weight"] = rnd(kv * hd, D)
        s[a + "attention.wo.weight"] = rnd(D, m["n_heads"] * hd)
        s[a + "attention_norm.weight"] = norm_w()
        s[a + "ffn_norm.weight"] = norm_w()
        f = a + "feed_forward."
        if L in mem_layers:
            s[f + "keys"] = rnd(2 * H * N, K // 2, std=1.0)
            s[f + "values.weight"] = shared.clone() if pk["mem_share_values"] else rnd(N * N, Vd).to(values_dtype)
            s[f + "query_proj.query_mlps.0.weight"] = rnd(H * K, D)
            s[f + "query_proj.query_mlps.0.bias"] = rnd(H * K, std=0.1)
            if pk["swilu_projection"] or Vd != D:
                s[f + "value_proj.weight"] = rnd(D, Vd)
                s[f + "value_proj.bias"] = rnd(D, std=0.1)
            if pk["swilu_projection"]:
                s[f + "swilu_projection.weight"] = rnd(Vd, D)
                s[f + "swilu_projection.bias"] = rnd(Vd, std=0.1)
            if pk["mem_gated"]:
                s[f + "gating.weight"] = rnd(1, D)
                s[f + "gating.bias"] = rnd(1, std=0.1)
        else:
            h = ffn_hidden(m)
            s[f + "w1.weight"] = rnd(h, D)
            s[f + "w2.weight"] = rnd(D, h)
            s[f + "w3.weight"] = rnd(h, D)
    s["norm.weight"] = norm_w()
    s["output.weight"] = rnd(V, D)
    return s


def write_consolidated(step: Path, state: dict, p: dict) -> Path:
    """``step/consolidated/{consolidated.pth, params.json}`` as the reference's consolidation writes them."""
    d = step / "consolidated"
    d.mkdir(parents=True)
    optim = {"state": {"output.weight": {"step": torch.tensor(10.0)}}, "param_groups": [{"lr": 1e-3}]}
    torch.save({"model": state, "optim": optim}, d / "consolidated.pth")
    (d / "params.json").write_text(json.dumps(p, indent=2))
    return d


def write_dcp_step(step: Path, state: dict, p: dict) -> Path:
    """A training step folder: DCP shards of {"model", "optim"}, params.json and a train_state file."""
    import torch.distributed.checkpoint as dcp

    step.mkdir(parents=True)
    optim = {"state": {"output.weight": {"exp_avg": torch.zeros_like(state["output.weight"])}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state, "optim": optim}, storage_writer=dcp.FileSystemWriter(step), no_dist=True)
    (step / "params.json").write_text(json.dumps(p, indent=2))
    (step / "train_state_00000.json").write_text(json.dumps({"step": 1000, "acc_step": 0}))
    return step


# ---- the independent computation ----------------------------------------------------------------
def brute_force_memory(state: dict, prefix: str, pk: dict, x: torch.Tensor):
    """One memory layer from raw tensors, float64, over ALL N² slots: (slots (n, H, k), scores, output (n, D))."""
    t = {k[len(prefix):]: v.double() for k, v in state.items() if k.startswith(prefix)}
    x = x.double()
    H, N, K, k = pk["mem_heads"], pk["mem_n_keys"], pk["mem_k_dim"], pk["mem_knn"]
    q = (x @ t["query_proj.query_mlps.0.weight"].T + t["query_proj.query_mlps.0.bias"]).view(-1, H, K)
    C = t["keys"].view(H, 2, N, K // 2)
    slots, scores, m = [], [], 0.0
    for h in range(H):
        s1 = q[:, h, : K // 2] @ C[h, 0].T  # (n, N)
        s2 = q[:, h, K // 2 :] @ C[h, 1].T  # (n, N)
        full = (s1[:, :, None] + s2[:, None, :]).reshape(-1, N * N)  # slot i*N + j
        sc, ids = full.topk(k, dim=-1)
        w = torch.softmax(sc, dim=-1)
        m = m + (w[:, :, None] * t["values.weight"][ids]).sum(1)
        slots.append(ids)
        scores.append(sc)
    vdt = state[prefix + "values.weight"].dtype
    out = m.to(vdt).double()  # the reference kernel sums in float32 and returns the table's dtype (bf16 rounds)
    if "swilu_projection.weight" in t:
        gate = x @ t["swilu_projection.weight"].T + t["swilu_projection.bias"]
        out = out * gate * torch.sigmoid(gate)
    if "value_proj.weight" in t:
        out = out @ t["value_proj.weight"].T + t["value_proj.bias"]
    if "gating.weight" in t:
        out = torch.sigmoid(x @ t["gating.weight"].T + t["gating.bias"]) * out
    return torch.stack(slots, 1), torch.stack(scores, 1), out


def reference_forward(state: dict, p: dict, tokens: list[int]):
    """Logits (T, vocab) and, per memory layer, (its input x, slots) — all from the raw state dict in float64."""
    m, pk = p["model"], p["model"]["productkey_args"]
    D, eps = m["dim"], m["norm_eps"]
    nh, kv = m["n_heads"], m["n_kv_heads"] or m["n_heads"]
    hd = m["head_dim"] or D // nh
    mem_layers = [int(x) for x in pk["layers"].split(",")]
    W = {k: v.double() for k, v in state.items()}
    T = len(tokens)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    pos = torch.arange(T, dtype=torch.float64)
    freqs = m["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(pos, freqs))  # (T, hd/2)

    def rope(x):  # x (T, h, hd): complex multiply of interleaved pairs
        xc = torch.view_as_complex(x.reshape(T, x.shape[1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * rot[:, None, :]).reshape(T, x.shape[1], hd)

    h = W["tok_embeddings.weight"][torch.tensor(tokens)]
    lookups = {}
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for L in range(m["n_layers"]):
        a = f"layers.{L}."
        x = rms(h, W[a + "attention_norm.weight"])
        q = rope((x @ W[a + "attention.wq.weight"].T).view(T, nh, hd))
        k = rope((x @ W[a + "attention.wk.weight"].T).view(T, kv, hd))
        v = (x @ W[a + "attention.wv.weight"].T).view(T, kv, hd)
        heads = []
        for i in range(nh):
            j = i // (nh // kv)  # consecutive query heads share a kv head
            att = torch.softmax(q[:, i] @ k[:, j].T / math.sqrt(hd) + mask, dim=-1)
            heads.append(att @ v[:, j])
        h = h + torch.cat(heads, -1) @ W[a + "attention.wo.weight"].T
        x = rms(h, W[a + "ffn_norm.weight"])
        if L in mem_layers:
            slots, _, out = brute_force_memory(state, a + "feed_forward.", pk, x)
            lookups[L] = (x, slots)
        else:
            f = a + "feed_forward."
            g = x @ W[f + "w1.weight"].T
            out = (g * torch.sigmoid(g) * (x @ W[f + "w3.weight"].T)) @ W[f + "w2.weight"].T
        h = h + out
    return rms(h, W["norm.weight"]) @ W["output.weight"].T, lookups


def real_pkm(path: Path):
    """A real product-key-memory ``PKM`` (dim 64, 4 heads, 16 keys, top-8, non-trivial LayerNorm) saved at ``path``."""
    from product_key_memory import PKM

    torch.manual_seed(0)
    pkm = PKM(dim=64, heads=4, num_keys=16, topk=8, dim_head=16).eval()
    with torch.no_grad():
        pkm.norm.weight.normal_(1.0, 0.2)
        pkm.norm.bias.normal_(0.0, 0.2)
    torch.save(pkm.state_dict(), path)
    return pkm
