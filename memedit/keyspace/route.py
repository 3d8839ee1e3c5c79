"""`memedit keys route`: write a new fact into one slot.

Pick a free slot, move its two sub-keys as little as needed for the fact's query to select it (in one head of one
layer), then train its value row so the target is predicted; report the collateral on background lookups and on
the other facts. The change (two sub-key rows, one value row) is a reversible :class:`Patch`
(memedit/storage/patch.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import limits
from ..errors import MemeditError
from ..lm.batching import text_batches
from ..lm.hooks import keys_name, memory_path, run_with_cache
from ..lm.model import MemoryModel
from ..lm.tokenizer import token_text
from ..storage.patch import Patch, write_rows
from ..storage.state import background, frozen_rows
from ..storage.store import Change, fingerprint
from ..tracing.capture import SlotCounter, answer_lookups, on_lookup, trainable_rows
from ..tracing.targets import accuracy, tokenize_target
from ..world.evaluate import last_logits
from ..world.facts import world_of
from .config import KEYS
from .subkeys import collateral, even_sample, frozen_key_rows, selected_slots, slots_replaced, subkey_row


def table_std(weight: torch.Tensor, sample_rows: int = 1 << 16) -> float:
    """The standard deviation of a value table's entries: over every row of a small table, else over evenly spaced
    rows (a step size needs no more, and a memory-mapped table is not read whole)."""
    step = max(1, weight.shape[0] // sample_rows)
    return float(weight.detach()[::step].double().std())


@dataclass
class RouteResult:
    layer: int
    head: int
    slot: int
    subkeys: tuple[int, int]  # (i, j): the slot's sub-keys in half 1 and half 2
    slot_choice: str  # how the slot was chosen
    slot_uses: int  # background accesses of the slot before routing
    moved: tuple[float, float]  # |change| of sub-key i and of sub-key j
    subkey_norms: tuple[float, float]  # their norms before
    rank: int  # the slot's rank in its head's top-k for the fact's query (0 = best)
    weight: float  # its softmax weight there
    target: str
    p_before: float  # probability of the target's token after the prompt
    p_after: float
    predicted_before: str
    predicted_after: str
    collateral: float  # fraction of probe lookups whose selected slots changed
    slots_replaced: float  # mean fraction of a probe lookup's k slots that changed
    probe_selecting_slot: int  # probe lookups that now select the routed slot
    facts_checked: int  # other facts' prompts scored before and after
    facts_accuracy_before: float
    facts_accuracy_after: float
    patch: Patch  # two sub-key rows and one value row (the model holds the new ones)

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "patch"}
        d["accuracy_drop_points"] = 100 * (self.facts_accuracy_before - self.facts_accuracy_after)
        return d


def slot_usage(model: MemoryModel, table: str, texts: Sequence[str] | None) -> tuple[torch.Tensor, str]:
    """Accesses of each row of a value table (rows,): stored background statistics, else counted over ``texts``."""
    t = model.table(table)
    bg = background(model)
    if bg is not None and f"counts.{t.name}" in bg[0]:
        return bg[0][f"counts.{t.name}"].long(), "background statistics"
    if not texts:
        raise MemeditError("no background statistics stored and no text to count slot accesses over")
    counter = SlotCounter(model)
    with torch.no_grad(), on_lookup(model, counter):
        for tokens, valid in text_batches(model, texts, 64):
            counter.batch(valid.reshape(-1))
            model.run_lookups(tokens)  # the counter sees the lookups; nothing after them is needed
    return counter.table_reads(t.name), f"counted over {len(texts):,} background passages"


@torch.no_grad()
def answer_queries(model: MemoryModel, text: str) -> dict[int, torch.Tensor]:
    """Each memory layer's query at the last position of ``text``: {layer: (H, K)} float32."""
    names = {L: f"{memory_path(L)}.hook_query" for L in model.memory_layers}
    _, cache = run_with_cache(model, torch.tensor([model.encode(text)]), names.values())
    return {L: cache[n][-1].float() for L, n in names.items()}


def subkey_moves(s1, s2, a: float, b: float, need: torch.Tensor, t1, t2):
    """Smallest moves (along q1, q2) that put sub-keys into stage 1 and the pair's score above ``need``.

    s1 (N1,), s2 (N2,) current sub-scores; t1, t2 the thresholds each must pass; a = |q1|², b = |q2|².
    Returns (d1, d2, cost) each (N1, N2): score increases of each half and the squared norm of the move.
    """
    lo1 = (t1 - s1).clamp(min=0)[:, None]  # (N1, 1)
    lo2 = (t2 - s2).clamp(min=0)[None, :]  # (1, N2)
    S = torch.maximum(lo1 + lo2, need - s1[:, None] - s2[None, :])  # total increase needed
    d1 = S * a / (a + b)  # the split minimising d1²/a + d2²/b ...
    d1 = torch.maximum(d1, lo1)
    d1 = torch.minimum(d1, S - lo2)  # ... within each half's own lower bound
    d2 = S - d1
    return d1, d2, d1**2 / a + d2**2 / b


def _eligible(model: MemoryModel, L: int, slot: int | None, usage: dict, frozen_values: dict, lookups) -> torch.Tensor:
    """(N*N,) bool: the slots of layer ``L``'s table a fact may be routed to (the given one, else the least used),
    leaving out frozen value rows and slots the prompt already reads (their rows serve other contexts too)."""
    table = next(t for t in model.tables if L in t.layers)
    eligible = torch.ones(table.n_rows, dtype=torch.bool)
    if slot is not None:
        eligible[:] = False
        eligible[slot] = True
    else:
        counts = usage[table.name][0]
        eligible &= counts <= counts.min()  # unused slots, or the least used if every slot is used
    eligible[frozen_values.get(table.name, torch.empty(0, dtype=torch.long))] = False
    for L2 in table.layers:
        eligible[lookups[L2].indices[0].flatten()] = False
    return eligible


def _cheapest_in_head(layer, h: int, q: torch.Tensor, scores: torch.Tensor, ok: torch.Tensor, margin: float):
    """(cost, slot, d1, d2, m) of the cheapest sub-key move that makes head ``h`` select an ``ok`` (N, N) slot for
    query ``q`` (K,), with ``scores`` the head's current top-k scores; cost inf when no slot is allowed."""
    cfg, k = layer.cfg, layer.cfg.knn
    keys = layer.keys4d.detach().float()  # (H, 2, N, K/2)
    q1, q2 = q[: cfg.k_dim // 2], q[cfg.k_dim // 2 :]
    s1, s2 = keys[h, 0] @ q1, keys[h, 1] @ q2  # (N,)
    top1, top2 = s1.topk(k + 1).values, s2.topk(k + 1).values
    in1, in2 = s1 >= top1[k - 1], s2 >= top2[k - 1]
    m = margin * float(scores[0] - scores[-1]) + 1e-4 * float(scores.abs().max())
    t1 = torch.where(in1, top1[k], top1[k - 1]) + m
    t2 = torch.where(in2, top2[k], top2[k - 1]) + m
    d1, d2, cost = subkey_moves(s1, s2, float(q1 @ q1), float(q2 @ q2), scores[-1] + m, t1, t2)
    cost = torch.where(ok, cost, torch.inf)
    c = int(cost.argmin())
    return float(cost.view(-1)[c]), c, float(d1.view(-1)[c]), float(d2.view(-1)[c]), m


def _best_slot(model: MemoryModel, text: str, slot, layer, head, background_texts, margin: float):
    """(cost, L, h, slot, d1, d2, m) of the cheapest routing over the candidate layers and heads, and the slot
    usage it was chosen by ({table: (counts, how they were counted)})."""
    layers = model.memory_layers
    frozen_keys, frozen_values = frozen_key_rows(model), frozen_rows(model)
    queries, lookups = answer_queries(model, text), answer_lookups(model, [text])
    usage: dict[str, tuple[torch.Tensor, str]] = {}
    best = None
    for L in [layer] if layer is not None else list(layers):
        table = next(t for t in model.tables if L in t.layers)
        if slot is None and table.name not in usage:
            usage[table.name] = slot_usage(model, table.name, background_texts)
        eligible = _eligible(model, L, slot, usage, frozen_values, lookups)
        N = layers[L].cfg.n_keys
        for h in [head] if head is not None else range(layers[L].cfg.heads):
            ok = eligible.view(N, N).clone()
            ok &= ~frozen_keys[L][h * 2 * N : h * 2 * N + N][:, None]
            ok &= ~frozen_keys[L][h * 2 * N + N : (h + 1) * 2 * N][None, :]
            cost, c, d1, d2, m = _cheapest_in_head(layers[L], h, queries[L][h], lookups[L].scores[0, h].float(), ok,
                                                   margin)
            if cost < float("inf") and (best is None or cost < best[0]):
                best = (cost, L, h, c, d1, d2, m)
    if best is None:
        raise MemeditError("no slot can be routed: every candidate slot or its sub-keys is frozen, or already read by "
                           "this prompt")
    return best, usage, queries


def _move_subkeys(model: MemoryModel, text: str, L: int, h: int, s: int, rows: torch.Tensor, d1: float, d2: float,
                  m: float, q: torch.Tensor) -> tuple[int, float]:
    """Move sub-key ``rows`` (2,) along the query's halves until head ``h`` selects slot ``s``; (its rank, its
    weight). The minimal move is computed against the old candidate grid; the real lookup confirms it."""
    mem = model.memory_layers[L]
    old_keys = mem.keys.detach()[rows].clone()
    q1, q2 = q[: mem.cfg.k_dim // 2], q[mem.cfg.k_dim // 2 :]
    extra = 0.0
    for _ in range(12):
        with torch.no_grad():
            mem.keys[rows[0]] = (old_keys[0].float() + (d1 + extra / 2) * q1 / (q1 @ q1)).to(mem.keys.dtype)
            mem.keys[rows[1]] = (old_keys[1].float() + (d2 + extra / 2) * q2 / (q2 @ q2)).to(mem.keys.dtype)
        lk = answer_lookups(model, [text])[L]
        hit = torch.nonzero(lk.indices[0, h] == s).flatten()
        if hit.numel():
            return int(hit[0]), float(lk.weights[0, h, hit[0]])
        extra = extra * 2 if extra else max(m, 1e-3)
    with torch.no_grad():
        mem.keys[rows] = old_keys
    raise MemeditError(f"could not route the fact's query to slot {s} in layer {L} head {h}")


def _train_value_row(model: MemoryModel, table, s: int, text: str, want: int) -> None:
    """Train value row ``s`` of ``table`` (Adam) until ``want`` is predicted after ``text``. Only this row changes:
    it is trained as a one-row leaf the forward pass reads instead of the table, so no gradient is table-sized."""
    values = table.weight
    tokens = torch.tensor([model.encode(text)])
    mom = torch.zeros(values.shape[1], dtype=torch.float32)
    var = torch.zeros(values.shape[1], dtype=torch.float32)
    lr = 0.25 * table_std(values)
    with trainable_rows(model, {table.name: torch.tensor([s])}) as leaves:
        row = leaves[table.name]  # (1, V)
        for step in range(1, 201):
            with torch.enable_grad():
                logits = model(tokens)[0, -1].float()
                loss = F.cross_entropy(logits[None], torch.tensor([want]))
                row.grad = None
                loss.backward()
            top2 = logits.detach().topk(2)
            # predicted with a clear margin; or predicted and 50 steps in (the final norm can cap the margin)
            if top2.indices[0] == want and (float(top2.values[0] - top2.values[1]) > 1.0 or step > 50):
                break
            g = row.grad[0].float()
            mom.mul_(0.9).add_(0.1 * g)
            var.mul_(0.999).add_(0.001 * g * g)
            upd = (mom / (1 - 0.9**step)) / ((var / (1 - 0.999**step)).sqrt() + 1e-8)
            with torch.no_grad():
                row[0] = (row[0].float() - lr * upd).to(row.dtype)
        with torch.no_grad():
            values[s] = row.detach()[0]


def _collateral(model: MemoryModel, patch: Patch, table, s: int, subject: str, probe, facts) -> tuple:
    """(probe lookups changed, slots replaced, probe lookups selecting slot ``s``, other facts checked, their
    accuracy (before, after)): measured with the patch's new rows, then its old ones, and left with the new."""
    if not (probe or facts):
        return 0.0, 0.0, 0, 0, (float("nan"), float("nan"))
    pb = text_batches(model, probe, 64) if probe else []
    f_prompts = [p for f in facts or [] if f.subject != subject for p in f.training_prompts]
    f_targets = [f.target_true for f in facts or [] if f.subject != subject for _ in f.training_prompts]
    after_slots = selected_slots(model, pb) if pb else {}
    acc_after = accuracy(model, f_prompts, f_targets) if f_prompts else float("nan")
    write_rows(model, patch, new=False)
    before_slots = selected_slots(model, pb) if pb else {}
    acc_before = accuracy(model, f_prompts, f_targets) if f_prompts else float("nan")
    write_rows(model, patch, new=True)
    changed = replaced = 0.0
    n_select = 0
    if pb:
        changed, replaced = collateral(before_slots, after_slots), slots_replaced(before_slots, after_slots)
        n_select = sum(int((v == s).any(-1).sum()) for L2, v in after_slots.items() if L2 in table.layers)
    return changed, replaced, n_select, len(f_prompts), (acc_before, acc_after)


def _check_route(model: MemoryModel, text: str, target: str, slot, layer, head, margin: float) -> int:
    """The target's one token id, after refusing what cannot be routed."""
    limits.number(margin, "--margin", 0.0, 1e6)
    tt = tokenize_target(model, text, target)
    if len(tt.ids) > 1:
        raise MemeditError(f"keys route writes one slot for one next token, and the target {tt.text!r} is "
                           f"{len(tt.ids)} tokens: use `memedit edit` (sparse memory finetuning) for it")
    layers = model.memory_layers
    if layer is not None and layer not in layers:
        raise MemeditError(f"layer {layer} is not a memory layer (memory layers: {list(layers)})")
    cfg = next(iter(layers.values())).cfg
    if head is not None and not 0 <= head < cfg.heads:
        raise MemeditError(f"head {head} is out of range 0..{cfg.heads - 1}")
    if slot is not None and not 0 <= slot < cfg.n_keys**2:
        raise MemeditError(f"slot id {slot} is out of range 0..{cfg.n_keys**2 - 1}")
    return tt.ids[0]


def route(
    model: MemoryModel,
    prompt: str,
    subject: str,
    target: str,
    slot: int | None = None,
    layer: int | None = None,
    head: int | None = None,
    background_texts: Sequence[str] | None = None,
    probe: Sequence[str] | None = None,
    facts: Sequence | None = None,
    margin: float = KEYS.margin,
) -> RouteResult:
    """Write a new fact into one slot: pick a free slot, move its two sub-keys as little as needed for the fact's
    query to select it (in one head of one layer), then train its value row so the target is predicted."""
    text = limits.subject_prompt(prompt, subject)
    want = _check_route(model, text, target, slot, layer, head, margin)
    base = fingerprint(model)
    logits0 = last_logits(model, [text])[0]
    (_, L, h, s, d1, d2, m), usage, queries = _best_slot(model, text, slot, layer, head, background_texts, margin)
    mem, N = model.memory_layers[L], model.memory_layers[L].cfg.n_keys
    i, j = divmod(s, N)
    table = next(t for t in model.tables if L in t.layers)
    rows = torch.tensor([subkey_row(mem, h, 0, i), subkey_row(mem, h, 1, j)])
    before = {keys_name(L): mem.keys.detach().clone(), table.state_names[0]: table.weight.detach()[s:s + 1].clone()}
    rank, weight = _move_subkeys(model, text, L, h, s, rows, d1, d2, m, queries[L][h])
    _train_value_row(model, table, s, text, want)
    logits1 = last_logits(model, [text])[0]
    old_keys, old_value = before[keys_name(L)][rows], before[table.state_names[0]]
    patch = Patch([Change(keys_name(L), keys_name(L), rows, old_keys, mem.keys.detach()[rows].clone(), [L]),
                   Change(table.state_names[0], table.name, torch.tensor([s]), old_value,
                          table.weight.detach()[s:s + 1].clone(), list(table.layers))],
                  base=base, message="keys route (3 rows)", kind="keys",
                  info={"command": "keys route", "prompt": prompt, "subject": subject, "target": target, "layer": L,
                        "head": h, "slot": s})
    changed, replaced, n_select, n_facts, acc = _collateral(model, patch, table, s, subject, probe, facts)
    usage_info = usage.get(table.name)
    tok = model.tokenizer
    return RouteResult(
        layer=L, head=h, slot=s, subkeys=(i, j),
        slot_choice="given" if slot is not None else f"least-used slot ({usage_info[1]})",
        slot_uses=int(usage_info[0][s]) if usage_info else -1,
        moved=tuple(float(x) for x in (mem.keys.detach()[rows].float() - old_keys.float()).norm(dim=-1)),
        subkey_norms=tuple(float(x) for x in old_keys.float().norm(dim=-1)),
        rank=rank, weight=weight, target=target, p_before=logits0.softmax(-1)[want].item(),
        p_after=logits1.softmax(-1)[want].item(),
        predicted_before=token_text(tok, int(logits0.argmax())), predicted_after=token_text(tok, int(logits1.argmax())),
        collateral=changed, slots_replaced=replaced, probe_selecting_slot=n_select, facts_checked=n_facts,
        facts_accuracy_before=acc[0], facts_accuracy_after=acc[1], patch=patch)


def route_texts(model: MemoryModel, probe: list[str] | None, eval_facts: int = KEYS.eval_facts
                ) -> tuple[list[str], list[str], list | None]:
    """(background passages that count slot usage, the probe sample that measures collateral, the world's facts to
    check) for `keys route`: the user's ``probe`` text, else the demo world's corpus, else none when background
    statistics are stored (slot usage comes from them; no probe collateral)."""
    world = world_of(model) if model.meta.get("world") else None
    if probe is not None:
        texts = probe
    elif world is not None:
        texts = world.training_sentences()
    elif background(model) is not None:
        texts = []
    else:
        raise MemeditError("keys route picks the least-used slot from background text: pass --probe FILE, or store "
                           "background statistics with `memedit background CORPUS` first")
    facts = even_sample(world.facts, eval_facts) if world is not None else None
    return texts, even_sample(texts, KEYS.probe_texts), facts
