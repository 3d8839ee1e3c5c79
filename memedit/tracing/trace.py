"""Trace a fact: which slots fire for a prompt, and how much each one moves the answer.

``trace(model, prompt, target)`` runs the prompt once through the hook registry (memedit/lm/hooks.py: the one
lookup routine ``layer.search`` and the memory layer's hook points) and returns a :class:`Trace` that answers
questions about the captured values. Their names are module paths, per memory layer ``l`` (``name(l, what)``):

    layers.{l}.feed_forward.hook_query       (T, H, K)     the queries
    layers.{l}.feed_forward.search.indices   (T, H, k)     selected slot ids (i * N + j)
    layers.{l}.feed_forward.search.subkeys   (T, H, k, 2)  sub-key ids (i, j)
    layers.{l}.feed_forward.search.scores    (T, H, k)     raw scores s1[i] + s2[j]
    layers.{l}.feed_forward.search.weights   (T, H, k)     softmax weights (float32)
    layers.{l}.feed_forward.hook_mem         (T, V)        m = sum of weighted value rows
    layers.{l}.feed_forward.hook_gate        (T, V)        silu(swilu_projection(x)) (Memory+ only)
    layers.{l}.feed_forward.hook_gating      (T, 1)        sigmoid(gating(x)) (gated memories only)
    layers.{l}.feed_forward                  (T, D)        the layer output
    hook_resid_final                         (T, D)        the residual stream before the final norm

Conventions (also in the README):
- A *unit* is (layer, head, slot): one selected slot of one head of one memory layer at one position.
- Exact contribution (reference §1): for a fixed token the layer output is linear in m, so unit r of head h writes
  ``value_proj((w[h,r] * Values[slot]) * gate)`` without the bias, times ``sigmoid(gating)`` when gated. The
  contributions of all units plus the bias term (``value_proj.bias``, times the gating) equal the layer output.
- Attribution (direct logit attribution) of a unit: its contribution through the final RMSNorm treated as
  linear, i.e. with the normalisation scale ``rsqrt(mean(h^2) + eps)`` frozen at its value for the final
  residual ``h`` of that position, times the norm weight, then the target's row of ``output``. The attributions
  of all components of the residual stream then sum exactly to the target's logit.
- Ablation of a unit: the change in log-probability of the target when that slot is dropped from its head's
  lookup at that position (weight 0, the other k-1 weights renormalised), everything downstream recomputed.
  All units are ablated in one batched forward, through an ``on_lookup`` hook that rewrites the weights.
- What a value row writes: the row through ``value_proj`` with the gate of the traced position (weight 1, no
  bias), then through the frozen final-norm scale and the unembedding: the tokens it promotes (largest logits)
  and suppresses (smallest). A unit's attribution is exactly its weight times this logit of the target.
- A target is a token sequence (memedit/tracing/targets.py): the prompt is run with the target's tokens appended
  (teacher forcing), so position ``p`` scores the token that follows it. The *target positions* are the positions that
  predict the target's tokens; the first of them is :attr:`Trace.position`. Attributions at a position are to the
  logit of the token scored there; ablations are always the change in the WHOLE target's log-probability (the sum
  over its tokens), which a drop at position ``p`` can move only at positions >= ``p``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import MemeditError
from ..lm.hooks import LOOKUP_FIELDS, ActivationCache, caching, memory_path, run_with_cache
from ..lm.memory import Lookup
from ..lm.model import MemoryModel
from ..lm.tokenizer import token_text
from .capture import core_set, on_lookup
from .readout import slot_writes
from .targets import TargetTokens, greedy_answer, tokenize_target


def name(layer: int, what: str) -> str:
    """The registry name (memedit/lm/hooks.py) of value ``what`` of memory layer ``layer``: query, mem, gate,
    gating, out, or a lookup field (``name(3, "weights") == "layers.3.feed_forward.search.weights"``)."""
    layer_path = memory_path(layer)
    if what == "out":
        return layer_path
    return f"{layer_path}.search.{what}" if what in LOOKUP_FIELDS else f"{layer_path}.hook_{what}"


@dataclass(frozen=True)
class Unit:
    """One selected slot of one head of one memory layer."""

    layer: int
    head: int
    slot: int


@dataclass
class Target:
    """The token sequence a trace scores (see memedit/tracing/targets.py for how it is tokenized)."""

    text: str  # the target text (or the model's own answer when none was given)
    token_ids: list[int]  # its tokens, predicted one after another
    tokens: list[str]  # the same as text (odd and byte tokens shown escaped)
    joined: bool = True  # False: the prompt's tokens were not a prefix of prompt + " " + target
    note: str = ""  # how the target was chosen or tokenized

    @property
    def token_id(self) -> int:
        """The first token's id."""
        return self.token_ids[0]

    @property
    def token(self) -> str:
        """The first token as text."""
        return self.tokens[0]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def make_target(model: MemoryModel, prompt: str, target: str | None) -> tuple[TargetTokens, str]:
    """The prompt and target tokenized together, and a note; without a target, the model's own answer."""
    if target is not None:
        tt = tokenize_target(model, prompt, target)
        return tt, tt.note
    answer = greedy_answer(model, prompt)
    if answer:
        with contextlib.suppress(MemeditError):
            tt = tokenize_target(model, prompt, answer)
            return tt, "no target given: tracing the model's own answer (greedy, to the end of the word)"
    ids = model.encode(prompt)  # the model answers with no word (e.g. punctuation): its single top token
    with torch.no_grad():
        top = int(model(torch.tensor([ids], device=_device(model)))[0, -1].argmax())
    text = model.tokenizer.decode([top])
    return (TargetTokens(prompt=prompt, text=text, prompt_ids=tuple(ids), ids=(top,), joined=True),
            "no target given: tracing the model's top next token")


def as_target(model: MemoryModel, tt: TargetTokens, note: str = "") -> Target:
    """The :class:`Target` of a tokenized prompt and target."""
    return Target(text=tt.text, token_ids=list(tt.ids), tokens=[token_text(model.tokenizer, i) for i in tt.ids],
                  joined=tt.joined, note=note)


def _device(model: MemoryModel) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _cached(model: MemoryModel, T: int) -> Iterator[ActivationCache]:
    """Within the block, record the named values (memedit/lm/hooks.py) of a forward pass over (B, T) tokens, each
    as a (B, T, ...) tensor; a lookup's fields under ``<layer>.search.<field>``."""
    names = ["hook_resid_final"] + [f"layers.{b}.hook_resid_pre" for b in range(len(model.layers))]
    for L in model.memory_layers:
        names += [memory_path(L), f"{memory_path(L)}.search"]
        names += [f"{memory_path(L)}.hook_{what}" for what in ("query", "mem", "gate", "gating")]
    out = ActivationCache()
    with caching(model, names) as raw:
        yield out
    for key, v in raw.items():
        if isinstance(v, Lookup):
            out.update({f"{key}.{f}": getattr(v, f).reshape(-1, T, *getattr(v, f).shape[1:]) for f in LOOKUP_FIELDS})
        elif ".hook_" in key and key.startswith(tuple(memory_path(L) for L in model.memory_layers)):
            out[key] = v.reshape(-1, T, *v.shape[1:])  # hook points inside a memory layer see flat (B*T, ...) tokens
        else:
            out[key] = v


def _chunk(model: MemoryModel, T: int, limit: int = 256) -> int:
    """How many copies of a T-token sequence to run at once: logits of at most ~2**26 floats per forward."""
    return max(1, min(limit, (1 << 26) // max(1, T * model.config.vocab_size)))


def block_inputs(model: MemoryModel, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every block's input residual (T, D) for one sequence of tokens (T,), and last the residual after the last
    block."""
    names = [f"layers.{b}.hook_resid_pre" for b in range(len(model.layers))] + ["hook_resid_final"]
    with torch.no_grad():
        _, cache = run_with_cache(model, tokens.to(_device(model)).unsqueeze(0), names)
    return [cache[n][0] for n in names]


def _dropped_logits(model: MemoryModel, tokens: torch.Tensor, pos: int, groups: Sequence[Sequence[Unit]],
                    inputs: list[torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Logits (G_chunk, T - pos, vocab) of positions pos..T-1 of copies of ``tokens`` (T,), copy g with group g
    dropped at ``pos``, by chunks.

    In each head, a dropped slot gets weight 0 and the remaining weights are renormalised (a head with every slot
    dropped reads nothing). Dropping is by slot id, so a lookup that changed because of an upstream drop is
    handled correctly. A drop at ``pos`` cannot change earlier positions (attention is causal) nor earlier blocks,
    so only positions >= pos are recomputed, from the first block with a dropped unit on, attending to the clean
    keys and values of earlier positions (``inputs``: every block's clean input residual and the final one, see
    :func:`block_inputs`). In that first block only position ``pos`` changes, so its feed-forward runs on that
    position alone (``MemoryModel.suffix_logits``, ``start_only``); groups run in chunks that share their first block.
    """
    T = tokens.shape[0]
    S = T - pos
    H = model.config.memory.heads
    inputs = block_inputs(model, tokens) if inputs is None else inputs
    chunk = _chunk(model, S)
    last = len(model.layers) - 1
    firsts = [min([u.layer for u in g], default=last) for g in groups]
    parts = []  # (start, end) of consecutive groups with the same first layer, at most ``chunk`` of them
    for i, f in enumerate(firsts):
        if parts and firsts[parts[-1][0]] == f and i - parts[-1][0] < chunk:
            parts[-1][1] = i + 1
        else:
            parts.append([i, i + 1])
    for start, end in parts:
        part = groups[start:end]
        G = len(part)
        width = max([1] + [sum(1 for u in g if u.layer == L) for g in part for L in model.memory_layers])
        dropped = {L: torch.full((G, H, width), -1, dtype=torch.long) for L in model.memory_layers}
        fill = {L: torch.zeros(G, H, dtype=torch.long) for L in model.memory_layers}
        for b, g in enumerate(part):
            for u in g:
                if u.layer not in dropped:
                    raise MemeditError(f"layer {u.layer} is not a memory layer")
                c = fill[u.layer][b, u.head]
                dropped[u.layer][b, u.head, c] = u.slot
                fill[u.layer][b, u.head] += 1
        first = firsts[start]

        # the hook runs inside this iteration (on_lookup below), so it sees this iteration's groups
        def rewrite(L: int, lk: Lookup) -> Lookup:
            # the flat row of position pos in every copy: copies hold S positions, or 1 in the first block
            rows = torch.arange(G) * (lk.indices.shape[0] // G)  # noqa: B023
            idx = lk.indices[rows]  # (G, H, k)  # noqa: B023
            hit = (idx.unsqueeze(-1) == dropped[L].to(idx.device).unsqueeze(-2)).any(-1)  # (G, H, k)  # noqa: B023
            w = lk.weights[rows].masked_fill(hit, 0.0)  # noqa: B023
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
            weights = lk.weights.clone()
            weights[rows] = w  # noqa: B023
            return lk.replace(weights=weights)

        with torch.no_grad(), on_lookup(model, rewrite):
            yield model.suffix_logits(inputs, pos, first, G, start_only=True).float().cpu()


def drop_slots(model: MemoryModel, tokens: torch.Tensor, pos: int, groups: Sequence[Sequence[Unit]],
               inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Log-probabilities (G, vocab) of the next token at ``pos`` with each group of units dropped at ``pos``."""
    return torch.cat([torch.log_softmax(lg[:, 0], -1) for lg in _dropped_logits(model, tokens, pos, groups, inputs)])


def drop_scores(model: MemoryModel, tokens: torch.Tensor, pos: int, groups: Sequence[Sequence[Unit]],
                positions: Sequence[int], scored: Sequence[int], inputs: list[torch.Tensor] | None = None
                ) -> torch.Tensor:
    """(G,): the summed log-probability of token ``scored[i]`` at ``positions[i]`` (all >= ``pos``), each group
    dropped at ``pos``."""
    if min(positions) < pos:
        raise ValueError("a drop at pos cannot change earlier positions: score only positions >= pos")
    p, want = torch.tensor(list(positions)) - pos, torch.tensor(list(scored))
    out = []
    for lg in _dropped_logits(model, tokens, pos, groups, inputs):
        lp = torch.log_softmax(lg[:, p], -1)  # (G, n, vocab)
        out.append(lp.gather(-1, want.expand(lp.shape[0], -1).unsqueeze(-1))[..., 0].sum(-1))
    return torch.cat(out)


class Trace:
    """Everything captured for one prompt, and the questions memedit asks of it.

    ``trace[name]`` gives a captured value (names in the module docstring) for the single prompt, shape (T, ...).
    """

    def __init__(self, model: MemoryModel, prompt: str, target: str | None = None):
        self.model = model
        self.prompt = prompt
        tt, note = make_target(model, prompt, target)
        tok = model.tokenizer
        unk = getattr(tok, "unk_id", None)
        self.unknown_words = [i for i, t in enumerate(tt.prompt_ids) if unk is not None and t == unk]
        # teacher forcing: the prompt, then every target token but the last
        self.tokens = torch.tensor(tt.sequence)  # (T,)
        self.T = len(self.tokens)
        self.prompt_len = len(tt.prompt_ids)
        self.position = self.prompt_len - 1  # the position that predicts the target's first token
        self.target_positions = list(range(self.position, self.position + len(tt.ids)))
        self._next = list(tt.prompt_ids[1:]) + list(tt.ids)  # the token scored at each position
        self.target = as_target(model, tt, note)
        with torch.no_grad(), _cached(model, self.T) as cache:
            logits = model(self.tokens.unsqueeze(0).to(_device(model)))
        self.cache = ActivationCache({k: v[0].cpu() for k, v in cache.items()})  # (T, ...) each
        self.logprobs = torch.log_softmax(logits[0].float().cpu(), -1)  # (T, vocab)
        self._ablation: dict[int, dict[int, torch.Tensor]] = {}

    # ---- captured values ------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.cache:
            raise KeyError(f"{key!r} was not captured; captured: {', '.join(sorted(self.cache))}")
        return self.cache[key]

    def __contains__(self, key: str) -> bool:
        return key in self.cache

    @property
    def layers(self) -> list[int]:
        return list(self.model.memory_layers)

    def token_at(self, pos: int) -> str:
        return token_text(self.model.tokenizer, int(self.tokens[pos]))

    def target_at(self, pos: int) -> int:
        """The token scored at ``pos``: the next token of the prompt, or of the target at a target position."""
        return self._next[pos]

    # ---- the whole target -----------------------------------------------------------------------
    @property
    def target_logprobs(self) -> torch.Tensor:
        """(n_target_tokens,): log P(each target token | prompt and the target's earlier tokens)."""
        p = torch.tensor(self.target_positions)
        return self.logprobs[p, torch.tensor(self.target.token_ids)]

    @property
    def logprob(self) -> float:
        """The whole target's log-probability: the sum over its tokens (teacher forcing)."""
        return float(self.target_logprobs.sum())

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.target.n_tokens

    @property
    def target_prob(self) -> float:
        """The whole target's probability (the product over its tokens)."""
        return float(torch.tensor(self.logprob).exp())

    @property
    def exact_match(self) -> bool:
        """Every target token is the model's greedy choice: greedy decoding from the prompt gives the target."""
        p = torch.tensor(self.target_positions)
        return bool((self.logprobs[p].argmax(-1) == torch.tensor(self.target.token_ids)).all())

    # ---- predictions ----------------------------------------------------------------------------
    def top_tokens(self, pos: int | None = None, n: int = 5) -> list[tuple[str, float]]:
        """The model's n most likely next tokens at ``pos`` with their probabilities."""
        pos = self.position if pos is None else pos
        lp, ids = self.logprobs[pos].topk(n)
        return [(token_text(self.model.tokenizer, int(i)), float(p.exp())) for p, i in zip(lp, ids, strict=True)]

    def prob(self, pos: int | None = None) -> float:
        """The probability of the scored token at ``pos`` (default: the target at the prediction position)."""
        pos = self.position if pos is None else pos
        return float(self.logprobs[pos, self.target_at(pos)].exp())

    def rank(self, pos: int | None = None) -> int:
        """The rank of the scored token among all next tokens at ``pos`` (1 = the top prediction)."""
        pos = self.position if pos is None else pos
        lp = self.logprobs[pos]
        return int((lp > lp[self.target_at(pos)]).sum()) + 1

    # ---- exact decomposition --------------------------------------------------------------------
    def contributions(self, layer: int, pos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact per-unit contributions (H, k, D) to the layer output at ``pos``, and the bias term (D,), float32.

        ``contributions.sum((0, 1)) + bias`` equals ``trace[name(layer, "out")][pos]``.
        """
        pos = self.position if pos is None else pos
        mem = self.model.memory_layers[layer]
        idx, w = self[name(layer, "indices")][pos], self[name(layer, "weights")][pos]  # (H, k) each
        c = w.unsqueeze(-1) * mem.values.weight[idx].float()  # (H, k, V): w * Values[slot]
        if mem.swilu_projection is not None:
            c = c * self[name(layer, "gate")][pos].float()
        D = self.model.config.dim
        bias = torch.zeros(D)
        if mem.value_proj is not None:
            c = c @ mem.value_proj.weight.float().T  # (H, k, D)
            if mem.value_proj.bias is not None:
                bias = mem.value_proj.bias.float().clone()
        if mem.gating is not None:
            g = self[name(layer, "gating")][pos].float()  # (1,)
            c, bias = c * g, bias * g
        return c, bias

    def logit_direction(self, pos: int | None = None) -> torch.Tensor:
        """(D,): the direction whose dot product with a residual write gives its attribution to the scored token."""
        pos = self.position if pos is None else pos
        norm = self.model.norm
        h = self["hook_resid_final"][pos].float()
        scale = torch.rsqrt(h.pow(2).mean() + norm.eps)
        return scale * norm.weight.float() * self.model.output.weight[self.target_at(pos)].float()

    def attribution(self, layer: int, pos: int | None = None) -> tuple[torch.Tensor, float]:
        """Direct logit attributions (H, k) of each unit to the scored token at ``pos``, and of the bias term."""
        c, bias = self.contributions(layer, pos)
        d = self.logit_direction(pos)
        return c @ d, float(bias @ d)

    # ---- ablation -------------------------------------------------------------------------------
    def ablation(self, layer: int, pos: int | None = None) -> torch.Tensor:
        """(H, k): change in the whole target's log-probability when each unit is dropped at ``pos``.

        Every unit of every layer is ablated in one batched forward, computed once per position.
        """
        pos = self.position if pos is None else pos
        if pos not in self._ablation:
            units = [self.units(L, pos) for L in self.layers]
            flat = [u for us in units for u in us]
            lp = self.drop([[u] for u in flat], pos)  # (U,)
            res, start = {}, 0
            for L, us in zip(self.layers, units, strict=True):
                H, k = self[name(L, "indices")].shape[1:]
                res[L] = lp[start : start + len(us)].view(H, k) - self.logprob
                start += len(us)
            self._ablation[pos] = res
        return self._ablation[pos][layer]

    @property
    def inputs(self) -> list[torch.Tensor]:
        """Every block's input residual (T, D) of the traced forward, and last the residual after the last block."""
        return [self.cache[f"layers.{b}.hook_resid_pre"] for b in range(len(self.model.layers))] + [
            self.cache["hook_resid_final"]]

    def drop(self, groups: Sequence[Sequence[Unit]], pos: int | None = None) -> torch.Tensor:
        """The whole target's log-probability (G,) with each group of units dropped at ``pos`` (batched forwards of
        the positions >= ``pos`` only; earlier target tokens keep their log-probability)."""
        pos = self.position if pos is None else pos
        later = [(p, t) for p, t in zip(self.target_positions, self.target.token_ids, strict=True) if p >= pos]
        unchanged = float(self.target_logprobs[: self.target.n_tokens - len(later)].sum())
        if not later:
            return torch.full((len(groups),), unchanged)
        p, t = zip(*later, strict=True)
        return unchanged + drop_scores(self.model, self.tokens, pos, groups, p, t, self.inputs)

    # ---- units ----------------------------------------------------------------------------------
    def units(self, layer: int, pos: int | None = None) -> list[Unit]:
        """The H*k units selected by ``layer`` at ``pos``, head-major, each head's slots by descending score."""
        pos = self.position if pos is None else pos
        idx = self[name(layer, "indices")][pos]  # (H, k)
        return [Unit(layer, h, int(s)) for h in range(idx.shape[0]) for s in idx[h]]

    def ranked(self, pos: int | None = None) -> list[tuple[Unit, float]]:
        """All units at ``pos`` with their attributions, most positive first."""
        out = []
        for L in self.layers:
            a, _ = self.attribution(L, pos)
            out += list(zip(self.units(L, pos), a.flatten().tolist(), strict=True))
        return sorted(out, key=lambda x: -x[1])

    def read_by(self, slot: int, layer: int, pos: int | None = None) -> list[int]:
        """The layers reading ``layer``'s value table that selected ``slot`` at ``pos`` (any head)."""
        pos = self.position if pos is None else pos
        table = self.table_of(layer)
        return [L for L in table.layers if bool((self[name(L, "indices")][pos] == slot).any())]

    def table_of(self, layer: int):
        return next(t for t in self.model.tables if layer in t.layers)

    def writes(self, unit: Unit, pos: int | None = None, n: int = 5) -> dict[str, list[tuple[str, float]]]:
        """What a unit's value row writes at ``pos`` (memedit/tracing/readout.py, with this position's gate and
        final-norm scale): the n tokens it promotes and suppresses most, with logits."""
        pos = self.position if pos is None else pos
        h = self["hook_resid_final"][pos].float()
        scale = torch.rsqrt(h.pow(2).mean() + self.model.norm.eps)
        gate = self[name(unit.layer, "gate")][pos] if name(unit.layer, "gate") in self else None
        gating = self[name(unit.layer, "gating")][pos] if name(unit.layer, "gating") in self else None
        (w,) = slot_writes(self.model, unit.layer, [unit.slot], gate, gating, scale, n)
        return {k: w[k] for k in ("promotes", "suppresses", "promote_ids", "suppress_ids")}

    def flip_count(self, pos: int | None = None, limit: int | None = None) -> int | None:
        """The smallest n such that dropping the n top-attributed units changes the top prediction at ``pos``.

        None when even dropping all of them (or ``limit``) leaves the scored token on top; 0 when the scored
        token is not the top prediction to begin with. One batched forward.
        """
        pos = self.position if pos is None else pos
        if self.rank(pos) != 1:
            return 0
        ranked = [u for u, _ in self.ranked(pos)]
        n_max = len(ranked) if limit is None else min(limit, len(ranked))
        lp = drop_slots(self.model, self.tokens, pos, [ranked[:n] for n in range(1, n_max + 1)], self.inputs)
        flipped = (lp.argmax(-1) != self.target_at(pos)).nonzero()
        return int(flipped[0, 0]) + 1 if len(flipped) else None

    # ---- reports ----------------------------------------------------------------------------------
    def position_report(self, pos: int, top_slots: int = 10, n_tokens: int = 5) -> dict:
        """Everything about one position as plain data (the --json schema of `memedit inspect`).

        Attributions are to the logit of the token scored at ``pos``; ablations are changes in the whole target's
        log-probability.
        """
        scored = self.target_at(pos)
        tok = self.model.tokenizer
        layers = []
        for L in self.layers:
            attr, bias_attr = self.attribution(L, pos)
            abl = self.ablation(L, pos)
            idx, sub = self[name(L, "indices")][pos], self[name(L, "subkeys")][pos]
            sc, w = self[name(L, "scores")][pos], self[name(L, "weights")][pos]
            heads = []
            for h in range(idx.shape[0]):
                slots = [{
                    "slot": int(idx[h, r]), "i": int(sub[h, r, 0]), "j": int(sub[h, r, 1]),
                    "score": float(sc[h, r]), "weight": float(w[h, r]), "attribution": float(attr[h, r]),
                    "ablation": float(abl[h, r]), "read_by": self.read_by(int(idx[h, r]), L, pos),
                } for r in range(idx.shape[1])]
                heads.append({"head": h, "slots": slots})
            out_attr = float(self[name(L, "out")][pos].float() @ self.logit_direction(pos))
            layers.append({"layer": L, "table": self.table_of(L).name, "heads": heads,
                           "bias_attribution": bias_attr, "attribution": out_attr})
        ablations = {(L, u.head, u.slot): float(a) for L in self.layers
                     for u, a in zip(self.units(L, pos), self.ablation(L, pos).flatten(), strict=True)}
        top = []
        for u, a in self.ranked(pos)[:top_slots]:
            wr = self.writes(u, pos, n_tokens)
            top.append({"layer": u.layer, "head": u.head, "slot": u.slot, "table": self.table_of(u.layer).name,
                        "attribution": a, "ablation": ablations[(u.layer, u.head, u.slot)],
                        "read_by": self.read_by(u.slot, u.layer, pos),
                        "promotes": [{"token": t, "token_id": i, "logit": x}
                                     for (t, x), i in zip(wr["promotes"], wr["promote_ids"], strict=True)],
                        "suppresses": [{"token": t, "token_id": i, "logit": x}
                                       for (t, x), i in zip(wr["suppresses"], wr["suppress_ids"], strict=True)]})
        lp = self.logprobs[pos, scored]
        return {
            "position": pos,
            "token": self.token_at(pos),
            "scored": {"token": token_text(tok, scored), "token_id": scored, "prob": float(lp.exp()),
                       "logprob": float(lp), "rank": self.rank(pos),
                       "logit_direct": float(self["hook_resid_final"][pos].float() @ self.logit_direction(pos))},
            "top": [{"token": t, "token_id": i, "prob": p} for (t, p), i in zip(
                self.top_tokens(pos, n_tokens), self.logprobs[pos].topk(n_tokens).indices.tolist(), strict=True)],
            "layers": layers,
            "top_slots": top,
        }

    def summary(self, n: int = 10) -> list[dict]:
        """The units whose removal lowers the whole target's log-probability most, over every target position."""
        rows = []
        for pos in self.target_positions:
            for L in self.layers:
                attr, _ = self.attribution(L, pos)
                abl = self.ablation(L, pos).flatten().tolist()
                for u, a, ab in zip(self.units(L, pos), attr.flatten().tolist(), abl, strict=True):
                    rows.append({"position": pos, "predicts": token_text(self.model.tokenizer, self.target_at(pos)),
                                 "layer": L, "head": u.head, "slot": u.slot, "table": self.table_of(L).name,
                                 "attribution": a, "ablation": ab})
        return sorted(rows, key=lambda r: r["ablation"])[:n]

    def to_dict(self, all_positions: bool = False, top_slots: int = 10) -> dict:
        """The whole trace as plain data: prompt, target (whole-target log-prob, per-token reports), top slots."""
        reports = [self.position_report(p, top_slots) for p in self.target_positions]
        main = reports[0]
        t = self.target
        d = {
            "prompt": self.prompt,
            "tokens": [self.token_at(p) for p in range(self.T)],  # decoded text; the ids beside it
            "token_ids": self.tokens.tolist(),
            "position": self.position,
            "target_positions": self.target_positions,
            "target": {"text": t.text, "tokens": t.tokens, "token_ids": t.token_ids, "n_tokens": t.n_tokens,
                       "token": t.token, "token_id": t.token_id, "joined": t.joined, "note": t.note,
                       "logprob": self.logprob, "mean_logprob": self.mean_logprob, "prob": self.target_prob,
                       "token_logprobs": self.target_logprobs.tolist(), "first_rank": main["scored"]["rank"],
                       "rank": main["scored"]["rank"], "exact_match": self.exact_match},
            "top": main["top"],
            "layers": main["layers"],
            "top_slots": main["top_slots"],
            "per_token": reports,
            "summary": self.summary(top_slots),
            "conventions": {
                "target": "a token sequence: the tokens of prompt + ' ' + target after the prompt's; logprob is the "
                          "sum over them with teacher forcing, mean_logprob per token; first_rank is the first "
                          "token's rank",
                "attribution": "direct logit attribution to the token predicted at that position: the unit's exact "
                               "contribution through the final RMSNorm with its scale frozen at that position's final "
                               "residual, then the token's output row",
                "ablation": "change in the whole target's log-probability when the slot is dropped from its head's "
                            "lookup at that position (remaining weights renormalised)",
            },
        }
        if self.unknown_words:
            d["warning"] = f"{len(self.unknown_words)} word(s) of the prompt are not in the vocabulary (<unk>)"
        if all_positions:
            d["positions"] = [self.position_report(p, top_slots) for p in range(self.T)]
        return d


def trace(model: MemoryModel, prompt: str, target: str | None = None) -> Trace:
    """A :class:`Trace` of ``prompt``, scoring the whole ``target`` or, if None, the model's own answer."""
    return Trace(model, prompt, target)



# ---- a fact and its phrasings ----------------------------------------------------------------------
@dataclass
class FactTrace:
    fact_id: str
    target: str
    phrasings: list[dict] = field(default_factory=list)  # per phrasing: prompt, heldout, prob, rank, top, flip
    core_set: dict[str, list[int]] = field(default_factory=dict)  # per value table
    core_over: int = 0  # how many phrasings the core set is taken over

    @property
    def core_size(self) -> int:
        return sum(len(v) for v in self.core_set.values())

    def to_dict(self) -> dict:
        return {"fact": self.fact_id, "target": self.target, "phrasings": self.phrasings,
                "core_set": self.core_set, "core_size": self.core_size, "core_over": self.core_over}


def trace_fact(model: MemoryModel, fact, heldout_in_core: bool = False) -> FactTrace:
    """Trace a fact's prompt and every paraphrase (training and held-out): core set and flip counts.

    The core set holds the slots selected at the answer position by every training phrasing (the prompt and its
    paraphrases; with ``heldout_in_core`` the held-out phrasings too), reference §6. The flip count of an
    answered phrasing is the smallest number of its top-attributed units whose removal changes the answer.
    """
    train, held = fact.training_prompts, list(fact.heldout_paraphrases)
    core_prompts = train + held if heldout_in_core else train
    ft = FactTrace(fact_id=fact.id, target=fact.target_true, core_set=core_set(model, core_prompts),
                   core_over=len(core_prompts))
    for p in train + held:
        t = trace(model, p, fact.target_true)
        answered = t.exact_match
        ft.phrasings.append({
            "prompt": p, "heldout": p in held, "prob": t.target_prob, "logprob": t.logprob, "rank": t.rank(),
            "answered": answered, "top": t.top_tokens(n=1)[0][0], "flip": t.flip_count() if answered else None,
        })
    return ft


@torch.no_grad()
def top_vs_random(model: MemoryModel, facts, n_drop: int = 10, seed: int = 0) -> dict:
    """Does dropping the n top-attributed slots hurt the answer more than dropping n random selected slots?

    For each fact whose first phrasing the model answers (target ranked first), trace it and drop (a) its
    ``n_drop`` top-attributed units, (b) ``n_drop`` units drawn at random from all units selected at the answer
    position; both in one batched forward. Returns per-fact rows and the fraction of facts where each drop lowered
    the target's probability.
    """
    rng = random.Random(seed)
    rows = []
    for f in facts:
        t = trace(model, f.prompt.replace("{}", f.subject), f.target_true)
        if not t.exact_match:
            continue
        ranked = [u for u, _ in t.ranked()]
        randoms = rng.sample(ranked, min(n_drop, len(ranked)))
        lp = t.drop([ranked[:n_drop], randoms])  # (2,) whole-target log-probabilities
        base = t.target_prob
        rows.append({"fact": f.id, "prob": base, "prob_top": float(lp[0].exp()), "prob_random": float(lp[1].exp())})
    n = len(rows)
    lowered = lambda key: sum(r[key] < r["prob"] for r in rows) / n if n else float("nan")  # noqa: E731
    mean = lambda key: sum(r[key] for r in rows) / n if n else float("nan")  # noqa: E731
    return {
        "facts_tried": len(facts), "facts_answered": n, "n_drop": n_drop, "seed": seed,
        "lowered_top": lowered("prob_top"), "lowered_random": lowered("prob_random"),
        "mean_prob": mean("prob"), "mean_prob_top": mean("prob_top"), "mean_prob_random": mean("prob_random"),
        "rows": rows,
    }
