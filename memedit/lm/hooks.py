"""The one hook registry: an activation's name is the path of the module that produces it (as in TransformerLens).

Every capture in memedit goes through :func:`hooks`, :func:`caching`, :func:`run_with_cache` or
:func:`run_with_hooks`. Names, for the memory layer of block ``L`` (module ``layers.{L}.feed_forward``):

    layers.{L}.feed_forward.hook_query    (n, H, K)   the queries; n = B*T, the batch's tokens flattened
    layers.{L}.feed_forward.search        Lookup      the one lookup routine's result (memedit/lm/memory.py)
    layers.{L}.feed_forward.hook_mem      (n, V)      the weighted sum of value rows
    layers.{L}.feed_forward.hook_gate     (n, V)      silu(swilu_projection(x)) (Memory+ only)
    layers.{L}.feed_forward.hook_gating   (n, 1)      sigmoid(gating(x)) (gated memories only)
    layers.{L}.feed_forward               (B, T, D)   the memory layer's output

and for every block ``b`` and the model: ``layers.{b}.hook_resid_pre`` (B, T, D) the block's input,
``hook_resid_final`` (B, T, D) the residual before the final norm, ``tok_embeddings`` (B, T, D). Any other
module path names that module's output. A Lookup's fields are named below it (``...search.weights``).

The tensors a patch may change are named here too: a layer's sub-keys (:func:`keys_name`) and its value table
(:func:`values_name`; a shared table is stored under its first reading layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from ..errors import MemeditError
from .memory import HookPoint, Lookup

HookFn = Callable[[Any, str], Any]  # (activation, name) -> a replacement activation, or None to keep it

LOOKUP_FIELDS = ("indices", "subkeys", "scores", "weights")


def memory_path(layer: int) -> str:
    """The module path of the memory layer of block ``layer``."""
    return f"layers.{layer}.feed_forward"


def keys_name(layer: int) -> str:
    """The state-dict name of the sub-keys of block ``layer``'s memory, (2*H*N, K/2)."""
    return f"{memory_path(layer)}.keys"


def values_name(layer: int) -> str:
    """The state-dict name of the value table block ``layer``'s memory reads, (N*N, V)."""
    return f"{memory_path(layer)}.values.weight"


def _detached(value: Any) -> Any:
    if isinstance(value, Lookup):
        return Lookup(**{k: v.detach() for k, v in value.__dict__.items()})
    return value.detach() if isinstance(value, torch.Tensor) else value


class ActivationCache(dict):
    """Activations by name (module paths). A Lookup's fields are addressable by ``<path>.search.<field>``."""

    def __getitem__(self, name: str) -> Any:
        key = name
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        parent, _, field = key.rpartition(".")
        if field in LOOKUP_FIELDS and dict.__contains__(self, parent):
            return getattr(dict.__getitem__(self, parent), field)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except (KeyError, TypeError):
            return False
        return True


def hook_names(model) -> list[str]:
    """Every name :func:`run_with_cache` records by default: the hook points, lookups and memory layer outputs."""
    names = [n for n, mod in model.named_modules() if isinstance(mod, HookPoint)]
    for L in model.memory_layers:
        names += [memory_path(L), f"{memory_path(L)}.search"]
    return names


@contextlib.contextmanager
def hooks(model, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
    """Within the block, call ``fn(activation, name)`` on every forward through each named module; a value it
    returns replaces the module's output."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, fn in fwd_hooks:
            path = name
            if path not in modules:
                raise MemeditError(f"no activation named {name!r} in this model (names are module paths, e.g. "
                                   f"{memory_path(next(iter(model.memory_layers), 0))}.hook_query)")
            handles.append(modules[path].register_forward_hook(lambda mod, inp, out, fn=fn, path=path: fn(out, path)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def caching(model, names: Iterable[str] | None = None) -> Iterator[ActivationCache]:
    """Within the block, record the named activations (default: :func:`hook_names`) of the last forward,
    detached."""
    cache = ActivationCache()
    wanted = list(hook_names(model) if names is None else names)
    with hooks(model, [(n, lambda out, path: cache.__setitem__(path, _detached(out))) for n in wanted]):
        yield cache


def run_with_cache(model, tokens: torch.Tensor, names: Iterable[str] | None = None
                   ) -> tuple[torch.Tensor, ActivationCache]:
    """(logits, cache): one forward over ``tokens`` (B, T), recording the named activations."""
    with caching(model, names) as cache:
        logits = model(tokens)
    return logits, cache


def run_with_hooks(model, tokens: torch.Tensor, fwd_hooks: Sequence[tuple[str, HookFn]]) -> torch.Tensor:
    """Logits of one forward over ``tokens`` (B, T) with ``fwd_hooks`` [(name, fn(activation, name))] attached."""
    with hooks(model, fwd_hooks):
        return model(tokens)
