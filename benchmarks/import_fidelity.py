"""How closely imported checkpoints reproduce an independent computation from their raw state dicts.

Run: .venv/bin/python benchmarks/import_fidelity.py [--smoke]
Builds the reference-layout fixtures of tests/reference_layout.py (consolidated and DCP), a real product-key-memory
PKM module and an XLM-layout state dict, loads each with memedit, and prints max differences and slot agreement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memedit  # noqa: E402
from memedit.tracing.capture import capture_lookups  # noqa: E402
from tests.reference_layout import (  # noqa: E402
    brute_force_memory,
    params,
    real_pkm,
    reference_forward,
    reference_state,
    write_consolidated,
    write_dcp_step,
)

PROMPTS = ["Reidreir was born in Thakrian", "the cat sat on the mat", "memory layers at scale", "0123456789 abc"]


def lingua_rows(root: Path, dtypes=("float32", None, "bfloat16")) -> None:
    p = params()
    state = reference_state(p)
    write_consolidated(root / "cons", state, p)
    write_dcp_step(root / "dcp", state, p)
    pk = p["model"]["productkey_args"]
    for src in ("cons", "dcp"):
        for dtype in dtypes:
            model = memedit.load(root / src, dtype=dtype)
            d_logit, d_out, d_same, same, total = 0.0, 0.0, 0.0, 0, 0
            for text in PROMPTS:
                ids = model.encode(text)
                xs = {}
                hooks = [m.register_forward_pre_hook(
                    lambda mod, a, L=L, xs=xs: xs.__setitem__(L, a[0].reshape(-1, a[0].shape[-1])))
                    for L, m in model.memory_layers.items()]
                with capture_lookups(model) as rec:
                    logits = model(torch.tensor([ids]))[0].double()
                for h in hooks:
                    h.remove()
                want, _ = reference_forward(state, p, ids)
                d_logit = max(d_logit, (logits - want).abs().max().item() / want.abs().max().item())
                for L, x in xs.items():
                    slots, _, out = brute_force_memory(state, f"layers.{L}.feed_forward.", pk, x)
                    got = rec[L][0].indices.sort(-1).values
                    ok = (got == slots.sort(-1).values).all(-1)  # (n, H)
                    same += int(ok.sum())
                    total += got.shape[0] * got.shape[1]
                    diff = (model.memory_layers[L](x).double() - out).abs().amax(-1) / out.abs().max()  # (n,)
                    d_out = max(d_out, diff.max().item())
                    if ok.all(-1).any():
                        d_same = max(d_same, diff[ok.all(-1)].max().item())
            print(f"{src:5s} dtype={str(dtype or 'as stored'):9s} logits max rel diff {d_logit:.2e}  "
                  f"memory output max rel diff {d_out:.2e} ({d_same:.2e} where all heads picked the same slots)  "
                  f"identical slot sets {same}/{total} (token, head)")


def pkm_row(root: Path) -> None:
    pkm = real_pkm(root / "pkm.pt")
    model = memedit.load(root / "pkm.pt", knn=8)
    picked = {}
    pkm.values.register_forward_hook(lambda m, a, kw, o: picked.update(ids=a[0]), with_kwargs=True)
    x = torch.randn(64, 16, 64)
    with torch.no_grad():
        want = pkm(x)
    got = model.memory_layers[0](x)
    ids = model.memory_layers[0].lookup(x.reshape(-1, 64)).indices.reshape(64 * 16, -1).sort(-1).values
    same = int((ids == picked["ids"].sort(-1).values).all(-1).sum())
    print(f"product-key-memory PKM vs its own forward: max abs diff {(got - want).abs().max().item():.2e} "
          f"(output scale {want.abs().max().item():.2f}), identical slot sets {same}/{ids.shape[0]} tokens")


def xlm_row(root: Path) -> None:
    from tests.test_importers import xlm_state

    s = xlm_state()
    torch.save(s, root / "xlm.pth")
    model = memedit.load(root / "xlm.pth", knn=8)
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(3))
    # independent: eval BatchNorm after the linear, brute force over all N² slots in float64
    g = {k.replace("query_proj.query_mlps.", ""): v.double() for k, v in s.items() if "query" in k}
    q = x.double() @ g["0.weight"].T + g["0.bias"]
    q = ((q - g["1.running_mean"]) / torch.sqrt(g["1.running_var"] + 1e-5) * g["1.weight"] + g["1.bias"])
    raw = {"m.keys": s["keys"].reshape(-1, 16), "m.values.weight": s["values.weight"],
           "m.query_proj.query_mlps.0.weight": torch.eye(128, dtype=torch.float64),
           "m.query_proj.query_mlps.0.bias": torch.zeros(128, dtype=torch.float64)}
    pk = {"mem_heads": 4, "mem_n_keys": 16, "mem_k_dim": 32, "mem_knn": 8}
    slots, _, out = brute_force_memory(raw, "m.", pk, q)  # identity query net: q is already the query
    got = model.memory_layers[0](x).double()
    ids = model.memory_layers[0].lookup(x).indices.sort(-1).values
    same = int((ids == slots.sort(-1).values).all(-1).sum())
    print(f"XLM memory (BatchNorm folded) vs brute force: max abs diff {(got - out).abs().max().item():.2e} "
          f"(output scale {out.abs().max().item():.2f}), identical slot sets {same}/{ids.numel() // 8} (token, head)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="the lingua layouts in float32 only: does it run")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        lingua_rows(Path(tmp), ("float32",) if args.smoke else ("float32", None, "bfloat16"))
        pkm_row(Path(tmp))
        xlm_row(Path(tmp))


if __name__ == "__main__":
    main()
