"""The host language model: a decoder-only transformer whose FFN is a product-key memory in some layers.

Names follow the reference implementation (docs/reference.md §2): ``tok_embeddings``,
``layers.{L}.attention.{wq,wk,wv,wo}``, ``layers.{L}.attention_norm``, ``layers.{L}.ffn_norm``,
``layers.{L}.feed_forward`` (a SwiGLU FFN or a :class:`~memedit.lm.memory.MemoryLayer`), ``norm``, ``output``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import limits
from ..errors import MemeditError
from .hooks import values_name
from .memory import HookPoint, MemoryConfig, MemoryLayer

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


@dataclass
class ModelConfig:
    dim: int = 128  # D: residual width
    n_layers: int = 4
    n_heads: int = 4  # attention heads
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads
    head_dim: int | None = None  # None means dim / n_heads
    vocab_size: int = -1
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256  # dense FFN hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seqlen: int = 1024
    memory: MemoryConfig = field(default_factory=lambda: MemoryConfig(layers=[]))
    standalone: bool = False  # a lone memory module (XLM / product-key-memory) with no host LM: one "layer" 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        mem = d.pop("memory", None) or {"layers": []}
        cfg = cls(**d, memory=MemoryConfig(**mem))
        _check_types(cfg)
        _check_types(cfg.memory)
        return cfg

    @property
    def ffn_hidden(self) -> int:
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


def _check_types(cfg: Any) -> None:
    """Raise TypeError naming the first field whose value has the wrong type (configs come from JSON files)."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list[int]": (list, tuple)}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        want = str(f.type).replace(" | None", "")
        if v is None and "None" in str(f.type) or want not in kinds:
            continue
        ok = isinstance(v, kinds[want]) and not (want in ("int", "float") and isinstance(v, bool))
        if ok and want == "list[int]":
            ok = all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        if not ok:
            raise TypeError(f"field {f.name!r} should be {want}, got {v!r}")


@dataclass
class ValueTable:
    """One value table and the memory layers that read it (a shared table appears once)."""

    name: str  # "shared" when read by several layers, else "layer{L}"
    layers: list[int]
    module: nn.Embedding

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def n_rows(self) -> int:
        return self.module.weight.shape[0]

    @property
    def state_names(self) -> list[str]:
        """The state-dict names under which this table appears (one per reading layer)."""
        return [values_name(L) for L in self.layers]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, seqlen: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (seqlen, head_dim/2), for rotating interleaved pairs."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float64), freqs)  # (T, hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, h, hd) by position."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, h, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, hd/2)
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values (B, T, kv_heads, hd) of normalised inputs x (B, T, D)."""
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        return apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Causal self-attention over x (B, T, D); with ``past`` (the keys and values of P earlier positions, from
        :meth:`kv`), x holds positions P..P+T-1 (cos and sin are theirs) and attends to the past as well."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k, v = self.kv(x, cos, sin)
        mask = None
        if past is not None and past[0].shape[1]:
            P = past[0].shape[1]
            k, v = torch.cat([past[0].expand(B, -1, -1, -1), k], 1), torch.cat([past[1].expand(B, -1, -1, -1), v], 1)
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)  # query i sees keys <= P + i
        # each kv head serves n_heads / n_kv_heads consecutive query heads: SDPA maps them itself (the same numbers
        # as repeating the kv heads, without the copies)
        gqa = self.n_heads != self.n_kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, feed_forward: nn.Module):
        super().__init__()
        self.attention = Attention(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = feed_forward
        self.hook_resid_pre = HookPoint()  # (B, T, D) the block's input residual (TransformerLens's name)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, first_only: bool = False) -> torch.Tensor:
        """The block's output (B, T, D) for inputs x (B, T, D); with ``first_only``, (B, 1, D) at the first position
        only: attention still reads all T (the same arithmetic as without), the feed-forward runs on one position."""
        x = self.hook_resid_pre(x)
        h = x + self.attention(self.attention_norm(x), cos, sin, past)
        if first_only:
            h = h[:, :1]  # (B, 1, D)
        return h + self.feed_forward(self.ffn_norm(h))

    def past(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention keys and values of this block for its inputs x (B, P, D): the ``past`` of later positions."""
        return self.attention.kv(self.attention_norm(x), cos, sin)


class StandaloneBlock(nn.Module):
    """Holds a lone memory module at ``layers.0.feed_forward`` so the registry works as for a host LM."""

    def __init__(self, feed_forward: MemoryLayer):
        super().__init__()
        self.feed_forward = feed_forward

    def forward(self, x: torch.Tensor, *rope) -> torch.Tensor:
        return self.feed_forward(x)


class MemoryModel(nn.Module):
    """The language model plus a registry of its memory layers and value tables.

    Called on token ids (B, T) it returns logits (B, T, vocab). ``memory_layers`` maps block index to
    :class:`MemoryLayer`; ``tables`` lists the value tables with the layers that read each.
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = cfg
        self.tokenizer = tokenizer
        self.source: str | None = None  # where it was loaded from (a folder, a file, or "bundled demo")
        self.read_only = False  # True for the model bundled inside the installed package
        self.meta: dict[str, Any] = {}  # extra facts saved with the model, e.g. {"world": {"seed": 1234, ...}}
        mem = cfg.memory
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None
        if cfg.standalone:
            if mem.layers != [0] or cfg.n_layers != 1:
                raise ValueError("a standalone memory module is one memory at layer 0")
            self.layers = nn.ModuleList([StandaloneBlock(MemoryLayer(cfg.dim, mem))])
            self.tok_embeddings = self.norm = self.output = None
            return
        shared = None
        if mem.layers and mem.share_values:
            v_dim = cfg.dim if mem.v_dim in (-1, None) else mem.v_dim
            shared = nn.Embedding(mem.n_slots, v_dim)
        bad = [L for L in mem.layers if not 0 <= L < cfg.n_layers]
        if bad:
            raise ValueError(f"memory layers {bad} are outside 0..{cfg.n_layers - 1}")
        if mem.peer_variant:
            raise ValueError("the PEER variant is not supported yet")
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        blocks = []
        for L in range(cfg.n_layers):
            ff: nn.Module
            if L in mem.layers:
                ff = MemoryLayer(cfg.dim, mem, values=shared)
            else:
                ff = FeedForward(cfg.dim, cfg.ffn_hidden)
            blocks.append(TransformerBlock(cfg, ff))
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.hook_resid_final = HookPoint()  # (B, T, D) the residual stream before the final norm

    # ---- registry -------------------------------------------------------------------------------
    @property
    def memory_layers(self) -> dict[int, MemoryLayer]:
        return {L: self.layers[L].feed_forward for L in self.config.memory.layers}

    @property
    def tables(self) -> list[ValueTable]:
        """Value tables in order of their first reading layer; a shared table appears once."""
        seen: dict[int, ValueTable] = {}
        for L, layer in self.memory_layers.items():
            key = id(layer.values)
            if key in seen:
                seen[key].layers.append(L)
            else:
                seen[key] = ValueTable(name="", layers=[L], module=layer.values)
        out = list(seen.values())
        for t in out:
            t.name = "shared" if len(t.layers) > 1 else f"layer{t.layers[0]}"
        return out

    def table(self, name: str) -> ValueTable:
        """The value table called ``name`` ("shared", "layer4", or a bare layer index "4")."""
        for t in self.tables:
            if name == t.name or (name.isdigit() and int(name) in t.layers):
                return t
        known = ", ".join(t.name for t in self.tables) or "none"
        raise MemeditError(f"no value table {name!r} in this model (tables: {known})")

    @property
    def dtype(self) -> torch.dtype:
        if self.config.standalone:
            return self.layers[0].feed_forward.keys.dtype
        return self.tok_embeddings.weight.dtype

    # ---- forward --------------------------------------------------------------------------------
    def rope(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0] < T or self._rope[1].device != device:
            head_dim = self.config.head_dim or self.config.dim // self.config.n_heads
            cos, sin = rope_tables(head_dim, max(T, self.config.max_seqlen), self.config.rope_theta)
            self._rope = (cos.shape[0], cos.to(device), sin.to(device))
        return self._rope[1][:T], self._rope[2][:T]

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block, before the final norm: (B, T, D)."""
        if self.config.standalone:
            raise MemeditError(
                "this is a standalone memory module with no host language model: commands that run text need a "
                "host LM; give query vectors instead (e.g. model.memory_layers[0].lookup(x))"
            )
        tokens = tokens.to(self.tok_embeddings.weight.device)  # callers build token ids on the CPU
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        h = self.tok_embeddings(tokens)
        for block in self.layers:
            h = block(h, cos, sin)
        return h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.hidden(tokens)  # first: a standalone module says here that it has no host LM
        return self.output(self.norm(self.hook_resid_final(h)))

    def mid_block(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """The residual of block ``layer`` after its attention, before its feed-forward: (B, T, D) for tokens (B, T).

        With :meth:`from_mid_block` it splits the forward pass in two, the same arithmetic as ``forward``: a caller
        that changes only value rows of memory layers >= ``layer`` (an edit's training) computes this part once.
        """
        tokens = tokens.to(self.tok_embeddings.weight.device)
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        h = self.tok_embeddings(tokens)
        for block in self.layers[:layer]:
            h = block(h, cos, sin)
        block = self.layers[layer]
        x = block.hook_resid_pre(h)
        return x + block.attention(block.attention_norm(x), cos, sin)

    def from_mid_block(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits (B, T, vocab) from :meth:`mid_block`'s residual h (B, T, D): the rest of block ``layer``, then
        every later block."""
        cos, sin = self.rope(h.shape[1], h.device)
        block = self.layers[layer]
        h = h + block.feed_forward(block.ffn_norm(h))
        for block in self.layers[layer + 1 :]:
            h = block(h, cos, sin)
        return self.output(self.norm(self.hook_resid_final(h)))

    def run_lookups(self, tokens: torch.Tensor) -> None:
        """Run tokens (B, T) only as far as the last memory layer's lookup: hooks on the lookups (``on_lookup``) see
        every one as in a full forward, and what no lookup depends on is never computed (that layer's value read,
        the later blocks, the logits). For observers that only count lookups: an audit, background statistics."""
        if not self.config.memory.layers:
            return
        last = self.memory_layers[max(self.config.memory.layers)].search

        def stop(module: nn.Module, args: Any, out: Any) -> None:
            raise _LookupsDone

        handle = last.register_forward_hook(stop)  # after every hook already there, so they all run first
        try:
            self.hidden(tokens)
        except _LookupsDone:
            pass
        finally:
            handle.remove()

    def suffix_logits(self, inputs: list[torch.Tensor], start: int, first_block: int, copies: int,
                      start_only: bool = False) -> torch.Tensor:
        """Logits (copies, T - start, vocab) of positions start..T-1, recomputed from block ``first_block`` on.

        ``inputs[b]`` is block b's input residual (T, D) from a forward over the same tokens. Positions before
        ``start`` cannot change (attention is causal), so their keys and values come from ``inputs``; the copies
        differ only by what hooks change inside the recomputed part (e.g. a lookup rewritten at ``start``).

        ``start_only``: the hooks change block ``first_block`` at position ``start`` only, and ``inputs`` ends with
        one more entry, the residual after the last block. That block's attention then reads the clean residual
        everywhere, so its outputs at later positions are the clean ones: its feed-forward (the memory read) runs
        at position ``start`` alone and the later positions' outputs are taken from ``inputs`` (a whole target's
        memory reads, once per copy, are what an ablation costs).
        """
        T = inputs[0].shape[0]
        cos, sin = self.rope(T, inputs[0].device)
        first = first_block
        if start_only:
            block = self.layers[first]
            past = block.past(inputs[first][:start].unsqueeze(0), cos[:start], sin[:start])
            h = block(inputs[first][start:].unsqueeze(0).expand(copies, -1, -1), cos[start:], sin[start:], past,
                      first_only=True)  # (G, 1, D)
            later = inputs[first + 1][start + 1 :]  # (S - 1, D) the clean outputs of the later positions
            h = torch.cat([h, later.to(h).unsqueeze(0).expand(copies, -1, -1)], 1)  # (G, S, D)
            first += 1
        else:
            h = inputs[first][start:].unsqueeze(0).expand(copies, -1, -1)  # (G, S, D)
        for b in range(first, len(self.layers)):
            block = self.layers[b]
            past = block.past(inputs[b][:start].unsqueeze(0), cos[:start], sin[:start])
            h = block(h, cos[start:], sin[start:], past)
        return self.output(self.norm(self.hook_resid_final(h)))

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt as the model reads it: BOS, then the text's tokens."""
        if self.tokenizer is None and self.config.standalone:
            raise MemeditError("this model has no tokenizer (a standalone memory module): give query vectors instead "
                               "of text")
        if self.tokenizer is None:
            why = self.meta.get("tokenizer_missing")  # set by importers, e.g. "tokenizer file ... not found"
            raise MemeditError(f"this model has no tokenizer{f' ({why})' if why else ''}: pass --tokenizer PATH "
                               "(a SentencePiece .model, a tiktoken file or a tokenizer.json)")
        ids = self.tokenizer.encode(limits.text(text, "the prompt"))
        if not ids:
            raise MemeditError(f"the prompt {text!r} has no tokens")
        bos = self.tokenizer.bos_id
        return ([bos] if bos is not None else []) + ids

    def check_context(self, ids: list[int] | int, what: str = "the prompt") -> None:
        """Refuse a token sequence (or a length) longer than the model's context (max_seqlen), before any memory is
        spent on it."""
        n, length = self.config.max_seqlen, ids if isinstance(ids, int) else len(ids)
        if length > n:
            raise MemeditError(f"{what} has {length:,} tokens, more than the model's context of {n:,}; shorten it")

    def param_counts(self) -> dict[str, int]:
        """Parameters split into memory (sub-keys, values, projections) and dense, each shared tensor once."""
        memory_ids = {id(p) for layer in self.memory_layers.values() for p in layer.parameters()}
        counts = {"memory": 0, "values": 0, "dense": 0}
        value_ids = {id(t.weight) for t in self.tables}
        for p in self.parameters():  # parameters() yields a shared tensor once
            if id(p) in value_ids:
                counts["values"] += p.numel()
            if id(p) in memory_ids:
                counts["memory"] += p.numel()
            else:
                counts["dense"] += p.numel()
        counts["total"] = counts["memory"] + counts["dense"]
        return counts

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 if "embeddings" in name else 1.0 / math.sqrt(p.shape[1]), generator=g)
            elif name.endswith("bias"):
                p.zero_()
        for layer in self.memory_layers.values():
            layer.reset_parameters(g)


class _LookupsDone(Exception):
    """Raised by :meth:`MemoryModel.run_lookups` once the last lookup has been observed."""


class _SkipInit(TorchFunctionMode):
    """Skips ``torch.nn.init``'s in-place initialisers: on the meta device they only cost seconds of imports."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def meta_model(cfg: ModelConfig) -> MemoryModel:
    """A model with every tensor on the meta device (shapes and dtypes, no memory, nothing initialised), for a loader
    to fill with stored tensors."""
    with torch.device("meta"), _SkipInit():
        return MemoryModel(cfg)
