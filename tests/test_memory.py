"""The memory layer against an independent brute-force computation of the lookup (reference §1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memedit.lm.memory import MemoryConfig, MemoryLayer


def brute_force(layer: MemoryLayer, x: torch.Tensor):
    """All N^2 slot scores from concatenated keys [C0_i ; C1_j], top-k, softmax, weighted sum, projection."""
    c = layer.cfg
    H, N, K, k = c.heads, c.n_keys, c.k_dim, c.knn
    W = layer.query_proj.query_mlps[0]
    q = (x.double() @ W.weight.double().T + W.bias.double()).view(-1, H, K)
    keys = layer.keys.double().view(H, 2, N, K // 2)
    full = torch.cat([keys[:, 0].unsqueeze(2).expand(H, N, N, K // 2),
                      keys[:, 1].unsqueeze(1).expand(H, N, N, K // 2)], dim=-1).reshape(H, N * N, K)  # slot i*N+j
    scores = torch.einsum("nhd,hsd->nhs", q, full)  # (n, H, N^2)
    s, idx = scores.topk(k, dim=-1)
    w = F.softmax(s, dim=-1)
    m = (w.unsqueeze(-1) * layer.values.weight.double()[idx]).sum(dim=(1, 2))  # (n, V)
    gate = F.silu(x.double() @ layer.swilu_projection.weight.double().T + layer.swilu_projection.bias.double())
    out = (m * gate) @ layer.value_proj.weight.double().T + layer.value_proj.bias.double()
    return idx, s, out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lookup_matches_brute_force(seed):
    torch.manual_seed(seed)
    cfg = MemoryConfig(layers=[0], n_keys=32, heads=4, knn=8, k_dim=16)
    layer = MemoryLayer(24, cfg)
    layer.reset_parameters()
    torch.nn.init.normal_(layer.query_proj.query_mlps[0].bias)
    x = torch.randn(200, 24)
    lk = layer.lookup(x)
    idx, s, out = brute_force(layer, x)
    # identical slot sets (scores of random float data do not tie)
    assert torch.equal(lk.indices.sort(-1).values, idx.sort(-1).values)
    torch.testing.assert_close(lk.scores.double(), s, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x).double(), out, atol=1e-5, rtol=0)
    # sub-key ids compose the slot id with the first half as the major index
    assert torch.equal(lk.subkeys[..., 0] * cfg.n_keys + lk.subkeys[..., 1], lk.indices)
    torch.testing.assert_close(lk.weights.sum(-1), torch.ones(200, 4))


def test_bfloat16_lookup_runs_and_agrees_on_scores():
    torch.manual_seed(0)
    cfg = MemoryConfig(layers=[0], n_keys=32, heads=2, knn=8, k_dim=16)
    layer = MemoryLayer(24, cfg)
    layer.reset_parameters()
    x = torch.randn(64, 24)
    ref = layer(x)
    layer16 = layer.to(torch.bfloat16)
    out = layer16(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert layer16.lookup(x.bfloat16()).weights.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_knn_larger_than_n_keys_is_refused():
    with pytest.raises(ValueError, match="knn"):
        MemoryLayer(16, MemoryConfig(layers=[0], n_keys=8, knn=16, k_dim=8))


def test_hooks_see_and_can_rewrite_the_one_lookup():
    torch.manual_seed(0)
    layer = MemoryLayer(24, MemoryConfig(layers=[0], n_keys=16, heads=2, knn=4, k_dim=8))
    layer.reset_parameters()
    x = torch.randn(5, 24)
    seen = []
    h = layer.search.register_forward_hook(lambda mod, inp, out: seen.append(out))
    base = layer(x)
    h.remove()
    assert seen and seen[0].indices.shape == (5, 2, 4)
    # zeroing every weight through a hook removes the value mix: the output is the projection bias
    h = layer.search.register_forward_hook(lambda mod, inp, out: out.replace(weights=torch.zeros_like(out.weights)))
    zeroed = layer(x)
    h.remove()
    torch.testing.assert_close(zeroed, layer.value_proj.bias.expand(5, -1))
    assert not torch.allclose(base, zeroed)


def test_topk_by_groups_is_the_exact_topk():
    from memedit.lm.memory import topk_by_groups

    g = torch.Generator().manual_seed(0)
    for N, k in ((1024, 32), (256, 32), (64, 4), (48, 16), (16, 16)):
        x = torch.randn(50, 3, N, generator=g)
        x[0, 0, : N // 2] = 0.5  # exact ties
        v, i = topk_by_groups(x, k)
        ref = x.topk(k, dim=-1)
        assert torch.equal(v, ref.values)
        assert torch.equal(x.gather(-1, i), v)  # each id holds its value; ids may differ only among ties
        assert (i.sort(-1).values.diff(dim=-1) > 0).all()  # no id twice


def test_topk_by_groups_passes_gradients_like_topk():
    from memedit.lm.memory import topk_by_groups

    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    (topk_by_groups(x, 32)[0] * w).sum().backward()
    g1 = x.grad.clone()
    x.grad = None
    (x.topk(32, dim=-1).values * w).sum().backward()
    assert torch.equal(g1, x.grad) and g1.count_nonzero() == 8 * 32


def test_weighted_rows_of_a_bfloat16_table_match_autograd_and_keep_no_gathered_rows():
    """Step 7 on a low-precision table: the value mix and the gradient of the weights are what plain autograd
    gives, and the backward pass keeps only the weights and ids, never the (n, H*k, V) upcast rows."""
    from memedit.lm.memory import ROWS_BLOCK, WeightedRows

    g = torch.Generator().manual_seed(0)
    table = torch.randn(5000, 48, generator=g).to(torch.bfloat16)
    n, R = ROWS_BLOCK + 37, 12  # more than one block
    idx = torch.randint(0, 5000, (n, R), generator=g)
    w = torch.rand(n, R, generator=g).requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    up = torch.randn(n, 48, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        m = WeightedRows.apply(w, idx, table)
    ref = (table[idx].float() * w_ref[:, :, None]).sum(1)  # (n, V)
    torch.testing.assert_close(m, ref, rtol=1e-6, atol=1e-6)
    (m * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    assert saved and max(saved) == n * R  # the weights and the ids; no gathered rows
