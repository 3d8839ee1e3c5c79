"""The one hook registry (memedit/lm/hooks.py): names are module paths."""

from __future__ import annotations

import pytest
import torch

from memedit.errors import MemeditError
from memedit.lm.hooks import hook_names, hooks, keys_name, run_with_cache, run_with_hooks, values_name
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


def test_names_are_module_paths_and_nothing_else():
    model = tiny_model()
    L = next(iter(model.memory_layers))
    assert name(L, "query") == f"layers.{L}.feed_forward.hook_query"
    assert name(L, "out") == f"layers.{L}.feed_forward"
    assert name(L, "weights") == f"layers.{L}.feed_forward.search.weights"
    _, cache = run_with_cache(model, torch.tensor([model.encode("a dog ran")]))
    assert "final.resid" not in cache and f"blocks.{L}.memory.query" not in cache  # the 0.1 names are gone
    with pytest.raises(MemeditError, match="names are module paths"):
        with hooks(model, [(f"blocks.{L}.memory.query", lambda out, n: None)]):
            pass
    t = trace(model, "Reidreir was born in", "Thakrian")
    assert "hook_resid_final" in t and "final.resid" not in t
    # the tensors a patch changes are named in lm too, and are the model's own state-dict names
    state = model.state_dict()
    assert torch.equal(state[keys_name(L)], model.memory_layers[L].keys)
    assert torch.equal(state[values_name(L)], model.memory_layers[L].values.weight)


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
