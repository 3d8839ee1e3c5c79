"""The one hook registry (memedit/lm/hooks.py): names are module paths, old names resolve for one release."""

from __future__ import annotations

import pytest
import torch

from memedit.errors import MemeditError
from memedit.lm.hooks import canonical, hook_names, hooks, run_with_cache, run_with_hooks
from memedit.tracing.trace import name, trace
from memedit.world.evaluate import memory_zeroed

from .conftest import tiny_model


def test_run_with_cache_names_are_module_paths():
    model = tiny_model()
    tokens = torch.tensor([model.encode("the cat sat on the mat")])
    logits, cache = run_with_cache(model, tokens)
    modules = dict(model.named_modules())
    for n in hook_names(model):
        assert n in modules  # every default name is a module's path
    L = next(iter(model.memory_layers))
    q = cache[f"layers.{L}.feed_forward.hook_query"]
    assert q.shape == (tokens.numel(), model.config.memory.heads, model.config.memory.k_dim)
    # the cache answers: the final residual through the final norm and the unembedding gives the logits
    h = cache["hook_resid_final"]
    assert torch.allclose(model.output(model.norm(h)), logits, atol=1e-5)
    # a block's input is the previous block's output: block 0's input is the token embedding
    assert torch.equal(cache["layers.0.hook_resid_pre"], model.tok_embeddings(tokens))
    # the lookup and its fields
    lk = cache[f"layers.{L}.feed_forward.search"]
    assert torch.equal(cache[f"layers.{L}.feed_forward.search.weights"], lk.weights)


def test_old_names_resolve_to_the_same_activation():
    assert canonical("blocks.3.memory.query") == "layers.3.feed_forward.hook_query"
    assert canonical("blocks.3.memory.out") == "layers.3.feed_forward"
    assert canonical("blocks.3.memory.weights") == "layers.3.feed_forward.search.weights"
    assert canonical("blocks.2.hook_resid_pre") == "layers.2.hook_resid_pre"
    assert canonical("final.resid") == "hook_resid_final"
    model = tiny_model()
    L = next(iter(model.memory_layers))
    _, cache = run_with_cache(model, torch.tensor([model.encode("a dog ran")]))
    assert cache[f"blocks.{L}.memory.query"] is cache[f"layers.{L}.feed_forward.hook_query"]
    t = trace(model, "Reidreir was born in", "Thakrian")
    assert t[f"blocks.{L}.memory.weights"] is t[name(L, "weights")]
    assert t["final.resid"] is t["hook_resid_final"] and "final.resid" in t


def test_run_with_hooks_replaces_an_activation():
    model = tiny_model()
    tokens = torch.tensor([model.encode("the cat sat on the mat")])
    zero = [(f"layers.{L}.feed_forward", lambda out, name: torch.zeros_like(out)) for L in model.memory_layers]
    got = run_with_hooks(model, tokens, zero)
    with memory_zeroed(model):
        want = model(tokens)
    assert torch.equal(got, want) and not torch.equal(got, model(tokens))
    seen = []
    with hooks(model, [("layers.0.hook_resid_pre", lambda x, name: seen.append(name))]):
        model(tokens)
    assert seen == ["layers.0.hook_resid_pre"]
    assert torch.equal(model(tokens), model(tokens))  # every hook is gone after the block


def test_an_unknown_name_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(MemeditError, match="no activation named 'layers.9.nothing'"):
        run_with_hooks(model, torch.tensor([[1, 2]]), [("layers.9.nothing", lambda out, name: None)])
