"""Change the sub-keys: online sparse adaptation on a text stream, and routing a new fact to a free slot.

Both write a reversible :class:`KeyPatch` (old and new rows of the tensors they touched, with checksums) and
apply it to the model folder atomically. Sub-key rows are rows of a layer's ``keys`` tensor (2*H*N, K/2):
row = h*2N + half*N + i. Frozen sub-keys are listed in the model folder's ``memedit/frozen.safetensors``
under "keys.layer{L}" (row ids of that layer's ``keys``); nothing here changes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import limits
from ..errors import MemeditError
from ..lm.batching import text_batches
from ..lm.model import MemoryModel
from ..lm.tokenizer import token_text

PATCH_FORMAT = "memedit-row-patch"
PATCH_VERSION = "1"


def keys_name(L: int) -> str:
    return f"layers.{L}.feed_forward.keys"


# ---- reversible row patches ------------------------------------------------------------------------------
@dataclass
class RowChange:
    """Rows of one state-dict tensor before and after a change."""

    rows: torch.Tensor  # (m,) int64 row ids
    old: torch.Tensor  # (m, d)
    new: torch.Tensor  # (m, d)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class KeyPatch:
    """A reversible change to rows of model tensors (sub-key rows, and for ``keys route`` one value row)."""

    changes: dict[str, RowChange]  # state-dict name -> rows
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return sum(c.rows.numel() for c in self.changes.values())

    def save(self, path: str | Path) -> Path:
        """Write the patch as safetensors (tensors "{name}.rows/.old/.new", checksums in the metadata), atomically."""
        from safetensors.torch import save_file

        from ..storage.checkpoint import atomic_path

        tensors, meta = {}, {"format": PATCH_FORMAT, "version": PATCH_VERSION, **self.meta}
        for name, c in self.changes.items():
            tensors.update({f"{name}.rows": c.rows, f"{name}.old": c.old, f"{name}.new": c.new})
            meta[f"sha256.{name}.old"], meta[f"sha256.{name}.new"] = _sha(c.old), _sha(c.new)
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> KeyPatch:
        from ..editing.patch import read_patch_file

        path = Path(path)
        meta, tensors = read_patch_file(path, PATCH_FORMAT, "key patch")
        changes = {}
        for key in tensors:
            if key.endswith(".rows"):
                name = key[: -len(".rows")]
                try:
                    c = RowChange(tensors[key].long(), tensors[f"{name}.old"], tensors[f"{name}.new"])
                except KeyError:
                    raise MemeditError(f"{path}: {name} lacks its old or new rows; the patch is damaged") from None
                if meta.get(f"sha256.{name}.old") != _sha(c.old) or meta.get(f"sha256.{name}.new") != _sha(c.new):
                    raise MemeditError(f"{path}: checksum mismatch for {name}; the patch is damaged")
                changes[name] = c
        return cls(changes, {k: v for k, v in meta.items() if not k.startswith("sha256.")})

    @property
    def id(self) -> str:
        """12 hex digits of a sha256 over every tensor name, row id, old and new row (the patch's log id)."""
        h = hashlib.sha256()
        for name in sorted(self.changes):
            c = self.changes[name]
            h.update(name.encode())
            for t in (c.rows.long(), c.old, c.new):
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:12]

    def _swap(self, model: MemoryModel, expect: str, put: str) -> None:
        params = dict(model.state_dict(keep_vars=True))
        for name, c in self.changes.items():  # check everything before changing anything
            if name not in params:
                raise MemeditError(f"the model has no tensor {name}; this patch is for another model")
            p = params[name]
            if c.rows.numel() and (c.rows.max() >= p.shape[0] or c.rows.min() < 0 or c.old.shape[1:] != p.shape[1:]):
                raise MemeditError(f"the patch's rows of {name} do not fit the model's {tuple(p.shape)}")
            if not torch.equal(p.detach()[c.rows].to(c.old.dtype), getattr(c, expect)):
                state = "not applied" if expect == "new" else "already applied, or the rows changed since"
                raise MemeditError(f"{name}: the model's rows do not match the patch ({state}); nothing was changed")
        with torch.no_grad():
            for name, c in self.changes.items():
                params[name].detach()[c.rows] = getattr(c, put).to(params[name].dtype)

    def apply(self, model: MemoryModel) -> None:
        """Write the new rows into ``model`` (refused unless its rows equal the patch's old rows)."""
        self._swap(model, "old", "new")

    def revert(self, model: MemoryModel) -> None:
        """Put the old rows back (refused unless the model holds exactly the patch's new rows)."""
        self._swap(model, "new", "old")


def diff_patch(before: dict[str, torch.Tensor], model: MemoryModel, meta: dict[str, str]) -> KeyPatch:
    """The patch from tensors saved ``before`` (name -> full tensor) to the model's current ones: changed rows only."""
    params = dict(model.state_dict(keep_vars=True))
    changes = {}
    for name, old in before.items():
        new = params[name].detach()
        rows = torch.nonzero((new != old).reshape(new.shape[0], -1).any(1)).flatten()
        if rows.numel():
            changes[name] = RowChange(rows, old[rows].clone(), new[rows].clone())
    return KeyPatch(changes, meta)


def default_patch_path(model: MemoryModel, kind: str) -> Path:
    from ..storage.checkpoint import state_dir
    from ..storage.state import PATCHES

    return state_dir(model, create=True) / PATCHES / f"keys-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"


def key_changes(model: MemoryModel, patch: KeyPatch) -> list:
    """The patch as store changes (a value tensor is named by its table; any other tensor is left for the store
    to refuse: a key patch may change only sub-keys and value rows)."""
    from ..storage.store import Change

    tables = {n: t for t in model.tables for n in t.state_names}
    out = []
    for name, c in patch.changes.items():
        t = tables.get(name)
        out.append(Change(t.state_names[0] if t else name, t.name if t else name, c.rows.long(), c.old, c.new))
    return out


def _commit_key_patch(model: MemoryModel, patch: KeyPatch, path: Path, revert: bool = False) -> None:
    """Apply (or revert) ``patch`` to the model folder as one row-log record, after checking the rows there."""
    from ..storage.checkpoint import state_dir
    from ..storage.store import Change, commit, differing

    changes = key_changes(model, patch)
    if revert:
        changes = [Change(c.name, c.label, c.rows, c.new, c.old) for c in changes]

    def check(m: MemoryModel, cs: list) -> None:
        for c, _ in differing(m, cs, "old"):
            state = "not applied" if revert else "already applied, or the rows changed since"
            raise MemeditError(f"{c.label}: the model's rows do not match the patch ({state}); nothing was changed")

    path = Path(path).resolve()
    d = state_dir(model).resolve()
    file = str(path.relative_to(d)) if path.is_relative_to(d) else str(path)
    what = patch.meta.get("command", "keys")
    commit(model, changes, {"op": "revert" if revert else "apply", "id": patch.id, "file": file, "kind": "keys",
                            "message": f"{what} ({patch.n_rows} rows)", "forced": False}, check=check)


def save_and_apply(model: MemoryModel, patch: KeyPatch, out: str | Path | None, kind: str) -> Path:
    """The patch's path, after saving it (the model holds its new rows in memory) and writing it to the model
    folder as one logged record."""
    from ..storage.store import check_changes, crash_point, store_of

    st = store_of(model)
    patch.revert(model)  # the folder's rows: the store writes the change itself
    try:
        check_changes(model, key_changes(model, patch), "the key patch")  # refuse before writing the patch file
        if out is not None:
            from ..storage.checkpoint import check_output

            check_output(model, Path(out))
        with st.locked():
            path = patch.save(out or default_patch_path(model, kind))
            crash_point("patch-saved")
            _commit_key_patch(model, patch, path)
    except BaseException:
        with contextlib.suppress(MemeditError):
            patch.apply(model)  # leave the in-memory model as the caller had it
        raise
    return path


def apply_file(model: MemoryModel, path: str | Path, revert: bool = False) -> KeyPatch:
    """Apply (or revert) a saved key patch to the model and its folder, and log it; returns the patch."""
    from ..storage.store import store_of

    store_of(model)
    patch = KeyPatch.load(path)
    _commit_key_patch(model, patch, Path(path), revert=revert)
    return patch


# ---- frozen sub-keys -------------------------------------------------------------------------------------
def frozen_key_rows(model: MemoryModel) -> dict[int, torch.Tensor]:
    """{layer: bool mask over its ``keys`` rows (2*H*N,)} of frozen sub-keys."""
    from ..storage.state import frozen_rows

    stored = frozen_rows(model)
    out = {}
    for L, layer in model.memory_layers.items():
        mask = torch.zeros(layer.keys.shape[0], dtype=torch.bool)
        ids = stored.get(f"keys.layer{L}")
        if ids is not None:
            if ids.numel() and (ids.min() < 0 or ids.max() >= mask.numel()):
                raise MemeditError(f"frozen.safetensors: keys.layer{L} has row ids outside 0..{mask.numel() - 1}")
            mask[ids] = True
        out[L] = mask
    return out


def subkey_row(layer, head: int, half: int, i: int) -> int:
    """Row of ``keys`` holding sub-key i of ``half`` in ``head``."""
    N = layer.cfg.n_keys
    return head * 2 * N + half * N + i


# ---- running text through the model --------------------------------------------------------------------
def lm_loss(model: MemoryModel, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real (non-pad) targets."""
    logits = model(tokens[:, :-1])  # (B, T-1, vocab)
    mask = valid[:, 1:]
    return F.cross_entropy(logits[mask].float(), tokens[:, 1:][mask])


def text_loss(model: MemoryModel, batches) -> float:
    """Token-weighted mean loss over batches (see loss_and_slots)."""
    return loss_and_slots(model, batches)[0]


def selected_slots(model: MemoryModel, batches) -> dict[int, torch.Tensor]:
    """Each real position's selected slots, sorted per head: {layer: (n_positions, H, k)} (see loss_and_slots)."""
    return loss_and_slots(model, batches)[1]


def collateral(before: dict[int, torch.Tensor], after: dict[int, torch.Tensor]) -> float:
    """Fraction of probe lookups (position, layer, head) whose set of selected slots changed."""
    changed = total = 0
    for L in before:
        diff = (before[L] != after[L]).any(-1)  # (n, H)
        changed += int(diff.sum())
        total += diff.numel()
    return changed / max(total, 1)


def slots_replaced(before: dict[int, torch.Tensor], after: dict[int, torch.Tensor]) -> float:
    """Mean fraction of a probe lookup's k selected slots that are new (a finer view of collateral)."""
    new = total = 0
    for L in before:
        kept = (after[L][..., :, None] == before[L][..., None, :]).any(-1)  # (n, H, k)
        new += int((~kept).sum())
        total += kept.numel()
    return new / max(total, 1)


# ---- keys adapt ----------------------------------------------------------------------------------------
MEASURE_TOKENS = 2048  # tokens of text and of probe on which loss and collateral are measured, before and after


def text_sample(model: MemoryModel, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Evenly spaced passages of ``texts`` holding at most ``max_tokens`` tokens (all of them when they fit; always
    at least one passage), so a measurement's cost is bounded whatever the size of the text."""
    lengths = [len(model.encode(t)) + 1 for t in texts]
    total = sum(lengths)
    if total <= max_tokens:
        return list(texts)
    stride = -(-total // max_tokens)  # ceil: an even spread over the whole text, not its beginning
    out, n = [], 0
    for i in range(0, len(texts), stride):
        if out and n + lengths[i] > max_tokens:
            break
        out.append(texts[i])
        n += lengths[i]
    return out


@torch.no_grad()
def loss_and_slots(model: MemoryModel, batches) -> tuple[float, dict[int, torch.Tensor]]:
    """(token-weighted mean loss, each real position's selected slots {layer: (n_positions, H, k)}) in one pass."""
    from ..tracing.capture import capture_lookups

    total, count = 0.0, 0
    out: dict[int, list[torch.Tensor]] = {L: [] for L in model.memory_layers}
    for tokens, valid in batches:
        with capture_lookups(model) as rec:
            loss = lm_loss(model, tokens, valid)
        n = int(valid[:, 1:].sum())
        total += loss.item() * n
        count += n
        for L, (lk,) in rec.items():  # lm_loss reads tokens[:, :-1]: its positions are valid[:, :-1]
            out[L].append(lk.indices[valid[:, :-1].reshape(-1)].sort(-1).values)
    return total / max(count, 1), {L: torch.cat(v) for L, v in out.items()}


@dataclass
class AdaptStep:
    step: int
    loss: float  # the batch's loss before this step's update
    subkeys_changed: int  # sub-keys this step moved (entered a stage-1 top-k, got a gradient, not frozen)
    slots_reindexed: int  # slot keys rewritten in the incremental exact index


@dataclass
class AdaptResult:
    steps: list[AdaptStep]
    loss_before: float  # mean loss over (a sample of) the adapted text before any step
    loss_after: float
    probe_loss_before: float  # mean loss over (a sample of) the probe (background) text
    probe_loss_after: float
    collateral: float  # fraction of probe lookups whose selected slots differ after adaptation
    slots_replaced: float  # mean fraction of a probe lookup's k slots that differ after adaptation
    probe_lookups: int  # probe positions measured (per layer and head)
    subkeys_changed: int  # distinct sub-keys changed overall
    subkeys_total: int
    frozen_skipped: int  # frozen sub-keys that entered a stage-1 top-k and were left alone
    exact_lookups: int  # probe lookups checked against the incrementally updated FAISS index
    exact_mismatches: int
    patch: KeyPatch

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("patch", "steps")}
        d["steps"] = [s.__dict__ for s in self.steps]
        return d


def adapt(
    model: MemoryModel,
    texts: Sequence[str],
    probe: Sequence[str],
    steps: int = 20,
    batch_size: int = 16,
    lr: float = 0.3,
    layers: Sequence[int] | None = None,
    check_exact: bool = False,
    progress: Callable[[AdaptStep], None] | None = None,
    measure_tokens: int = MEASURE_TOKENS,
) -> AdaptResult:
    """Online sparse adaptation of the sub-keys on ``texts``: each step (one batch, SGD on the LM loss) moves only
    sub-keys that entered a stage-1 top-k in that batch; frozen sub-keys and every other parameter stay fixed.

    A step costs one batch's forward and backward pass. Loss and collateral are measured once before and once
    after, on evenly spaced samples of at most ``measure_tokens`` tokens of ``texts`` and of ``probe``.

    ``check_exact``: keep every head's slot keys in a FAISS index updated incrementally, and check the probe
    lookups against it at the end. It holds N² × K float32 per head (2 GiB at N 1024, K 512), so only when asked.
    """
    from ..tracing.capture import capture_lookups
    from . import exact

    limits.count(steps, "--steps", 1, limits.MAX_ADAPT_STEPS)
    limits.count(batch_size, "--batch-size", 1, limits.MAX_BATCH_SIZE)
    limits.number(lr, "--lr", 0.0, limits.MAX_LR)
    layers = list(layers or model.memory_layers)
    for L in layers:
        if L not in model.memory_layers:
            raise MemeditError(f"layer {L} is not a memory layer (memory layers: {list(model.memory_layers)})")
    mem = {L: model.memory_layers[L] for L in layers}
    frozen = frozen_key_rows(model)
    batches = text_batches(model, texts, batch_size)
    text_texts = text_sample(model, texts, measure_tokens)
    text_measured = text_batches(model, text_texts, 64)
    probe_texts = text_sample(model, probe, measure_tokens)
    probe_batches = text_batches(model, probe_texts, 64)
    # without a probe of its own (the CLI's fallback) the probe sample is the text sample: measure it once
    same = probe_texts == text_texts
    before = {keys_name(L): m.keys.detach().clone() for L, m in mem.items()}
    probe_loss_before, probe_slots = loss_and_slots(model, probe_batches)
    loss_before = probe_loss_before if same else text_loss(model, text_measured)
    indexes = {L: exact.layer_indexes(m) for L, m in mem.items()} if check_exact else {}

    model.requires_grad_(False)
    for m in mem.values():
        m.keys.requires_grad_(True)
    history, changed_any = [], {L: torch.zeros(m.keys.shape[0], dtype=torch.bool) for L, m in mem.items()}
    skipped = {L: torch.zeros_like(v) for L, v in changed_any.items()}
    try:
        for step in range(steps):
            tokens, valid = batches[step % len(batches)]
            with capture_lookups(model) as rec, torch.enable_grad():
                loss = lm_loss(model, tokens, valid)
                loss.backward()
            n_changed = 0
            with torch.no_grad():
                for L, m in mem.items():
                    N = m.cfg.n_keys
                    stage1 = rec[L][0].stage1[valid[:, :-1].reshape(-1)]  # (n, H, 2, k) sub-key ids per half
                    H = stage1.shape[1]
                    base = (torch.arange(H)[:, None] * 2 * N + torch.arange(2)[None, :] * N)  # (H, 2) row offsets
                    rows = (stage1 + base[None, :, :, None]).unique()
                    mask = torch.zeros(m.keys.shape[0], dtype=torch.bool)
                    mask[rows] = True
                    skipped[L] |= mask & frozen[L]
                    mask &= ~frozen[L]
                    grad = m.keys.grad * mask[:, None]
                    moved = grad.ne(0).any(1)
                    m.keys.sub_(lr * grad)
                    m.keys.grad = None
                    changed_any[L] |= moved
                    n_changed += int(moved.sum())
            reindexed = sum(exact.sync_indexes(indexes[L], m) for L, m in mem.items()) if check_exact else 0
            st = AdaptStep(step + 1, loss.item(), n_changed, reindexed)
            history.append(st)
            if progress:
                progress(st)
    finally:
        for m in mem.values():
            m.keys.requires_grad_(False)
            m.keys.grad = None
    probe_loss_after, now = loss_and_slots(model, probe_batches)
    n_exact = n_bad = 0
    if check_exact:
        checked = exact.corpus_queries(model, probe_texts, limit=2048)
        heads = exact.compare({L: checked[L] for L in mem}, exact.rtol_for(model.dtype), indexes=indexes)
        n_exact, n_bad = sum(h.lookups for h in heads), sum(h.mismatches for h in heads)
    patch = diff_patch(before, model, {"command": "keys adapt", "steps": str(steps), "lr": str(lr),
                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return AdaptResult(
        history, loss_before, probe_loss_after if same else text_loss(model, text_measured), probe_loss_before,
        probe_loss_after,
        collateral(probe_slots, now), slots_replaced(probe_slots, now), len(next(iter(now.values()))),
        sum(int(v.sum()) for v in changed_any.values()), sum(m.keys.shape[0] for m in mem.values()),
        sum(int(v.sum()) for v in skipped.values()), n_exact, n_bad, patch)


# ---- keys route ----------------------------------------------------------------------------------------
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
    patch: KeyPatch

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "patch"}
        d["accuracy_drop_points"] = 100 * (self.facts_accuracy_before - self.facts_accuracy_after)
        return d


def slot_usage(model: MemoryModel, table: str, texts: Sequence[str] | None) -> tuple[torch.Tensor, str]:
    """Accesses of each row of a value table (rows,): stored background statistics, else counted over ``texts``."""
    from ..storage.state import background

    t = model.table(table)
    bg = background(model)
    if bg is not None and f"counts.{t.name}" in bg[0]:
        return bg[0][f"counts.{t.name}"].long(), "background statistics"
    if not texts:
        raise MemeditError("no background statistics stored and no text to count slot accesses over")
    from ..tracing.capture import SlotCounter, on_lookup

    counter = SlotCounter(model)
    with torch.no_grad(), on_lookup(model, counter):
        for tokens, valid in text_batches(model, texts, 64):
            counter.batch(valid.reshape(-1))
            model.run_lookups(tokens)  # the counter sees the lookups; nothing after them is needed
    return counter.table_reads(t.name), f"counted over {len(texts):,} background passages"


@torch.no_grad()
def answer_queries(model: MemoryModel, text: str) -> dict[int, torch.Tensor]:
    """Each memory layer's query at the last position of ``text``: {layer: (H, K)} float32."""
    from ..lm.hooks import memory_path, run_with_cache

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
    margin: float = 0.25,
) -> RouteResult:
    """Write a new fact into one slot: pick a free slot, move its two sub-keys as little as needed for the fact's
    query to select it (in one head of one layer), then train its value row so the target is predicted."""
    from ..storage.state import frozen_rows
    from ..tracing.capture import answer_lookups
    from ..tracing.targets import accuracy, tokenize_target
    from ..world.evaluate import last_logits

    text = limits.subject_prompt(prompt, subject)
    limits.number(margin, "--margin", 0.0, 1e6)
    tt = tokenize_target(model, text, target)
    if len(tt.ids) > 1:
        raise MemeditError(f"keys route writes one slot for one next token, and the target {tt.text!r} is "
                           f"{len(tt.ids)} tokens: use `memedit edit` (sparse memory finetuning) for it")
    want = tt.ids[0]
    layers = model.memory_layers
    if layer is not None and layer not in layers:
        raise MemeditError(f"layer {layer} is not a memory layer (memory layers: {list(layers)})")
    cfg = next(iter(layers.values())).cfg
    N, k, H = cfg.n_keys, cfg.knn, cfg.heads
    if head is not None and not 0 <= head < H:
        raise MemeditError(f"head {head} is out of range 0..{H - 1}")
    if slot is not None and not 0 <= slot < N * N:
        raise MemeditError(f"slot id {slot} is out of range 0..{N * N - 1}")
    candidates = [layer] if layer is not None else list(layers)
    frozen_keys, frozen_values = frozen_key_rows(model), frozen_rows(model)

    # the fact's current prediction and lookups
    logits0 = last_logits(model, [text])[0]
    p_before = logits0.softmax(-1)[want].item()
    queries = answer_queries(model, text)
    lookups = answer_lookups(model, [text])
    usage: dict[str, tuple[torch.Tensor, str]] = {}

    best = None  # (cost, L, h, slot, d1, d2)
    for L in candidates:
        table = next(t for t in model.tables if L in t.layers)
        if slot is None and table.name not in usage:
            usage[table.name] = slot_usage(model, table.name, background_texts)
        keys = layers[L].keys4d.detach().float()  # (H, 2, N, K/2)
        eligible = torch.ones(N * N, dtype=torch.bool)
        if slot is not None:
            eligible[:] = False
            eligible[slot] = True
        else:
            counts = usage[table.name][0]
            eligible &= counts <= counts.min()  # unused slots, or the least used if every slot is used
        eligible[frozen_values.get(table.name, torch.empty(0, dtype=torch.long))] = False
        for L2 in table.layers:  # a slot the prompt already reads: its value row serves other contexts too
            eligible[lookups[L2].indices[0].flatten()] = False
        for h in [head] if head is not None else range(H):
            q = queries[L][h]
            q1, q2 = q[: cfg.k_dim // 2], q[cfg.k_dim // 2 :]
            s1, s2 = keys[h, 0] @ q1, keys[h, 1] @ q2  # (N,)
            top1, top2 = s1.topk(k + 1).values, s2.topk(k + 1).values
            in1, in2 = s1 >= top1[k - 1], s2 >= top2[k - 1]
            scores = lookups[L].scores[0, h].float()
            m = margin * float(scores[0] - scores[-1]) + 1e-4 * float(scores.abs().max())
            t1 = torch.where(in1, top1[k], top1[k - 1]) + m
            t2 = torch.where(in2, top2[k], top2[k - 1]) + m
            d1, d2, cost = subkey_moves(s1, s2, float(q1 @ q1), float(q2 @ q2), scores[-1] + m, t1, t2)
            ok = eligible.view(N, N).clone()
            ok &= ~frozen_keys[L][h * 2 * N : h * 2 * N + N][:, None]
            ok &= ~frozen_keys[L][h * 2 * N + N : (h + 1) * 2 * N][None, :]
            cost = torch.where(ok, cost, torch.inf)
            c = int(cost.argmin())
            if torch.isfinite(cost.view(-1)[c]) and (best is None or cost.view(-1)[c] < best[0]):
                best = (float(cost.view(-1)[c]), L, h, c, float(d1.view(-1)[c]), float(d2.view(-1)[c]), m)
    if best is None:
        raise MemeditError("no slot can be routed: every candidate slot or its sub-keys is frozen, or already read by "
                           "this prompt")
    _, L, h, s, d1, d2, m = best
    i, j = divmod(s, N)
    mem = layers[L]
    table = next(t for t in model.tables if L in t.layers)
    rows = torch.tensor([subkey_row(mem, h, 0, i), subkey_row(mem, h, 1, j)])
    old_keys = mem.keys.detach()[rows].clone()
    q = queries[L][h]
    q1, q2 = q[: cfg.k_dim // 2], q[cfg.k_dim // 2 :]
    extra = 0.0
    for _ in range(12):  # the minimal move is computed against the old candidate grid; confirm with the real lookup
        with torch.no_grad():
            mem.keys[rows[0]] = (old_keys[0].float() + (d1 + extra / 2) * q1 / (q1 @ q1)).to(mem.keys.dtype)
            mem.keys[rows[1]] = (old_keys[1].float() + (d2 + extra / 2) * q2 / (q2 @ q2)).to(mem.keys.dtype)
        lk = answer_lookups(model, [text])[L]
        hit = torch.nonzero(lk.indices[0, h] == s).flatten()
        if hit.numel():
            break
        extra = extra * 2 if extra else max(m, 1e-3)
    else:
        with torch.no_grad():
            mem.keys[rows] = old_keys
        raise MemeditError(f"could not route the fact's query to slot {s} in layer {L} head {h}")
    rank, weight = int(hit[0]), float(lk.weights[0, h, hit[0]])

    # the value row: trained so that the target is predicted (only this row changes; it is trained as a one-row
    # leaf the forward pass reads instead of the table, so no gradient is as large as the table)
    from ..tracing.capture import trainable_rows

    values = table.weight
    old_value = values.detach()[s].clone()
    tokens = torch.tensor([model.encode(text)])
    mom, var = torch.zeros_like(old_value, dtype=torch.float32), torch.zeros_like(old_value, dtype=torch.float32)
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
    logits1 = last_logits(model, [text])[0]
    tok = model.tokenizer
    patch = KeyPatch(
        {keys_name(L): RowChange(rows, old_keys, mem.keys.detach()[rows].clone()),
         table.state_names[0]: RowChange(torch.tensor([s]), old_value[None], values.detach()[s][None].clone())},
        {"command": "keys route", "prompt": prompt, "subject": subject, "target": target, "layer": str(L),
         "head": str(h), "slot": str(s), "created": time.strftime("%Y-%m-%dT%H:%M:%S")})

    # collateral: probe lookups, and the other facts' accuracy (measured with and without the patch)
    n_probe_changed, n_replaced, n_select, acc = 0.0, 0.0, 0, (float("nan"), float("nan"))
    n_facts = 0
    if probe or facts:
        pb = text_batches(model, probe, 64) if probe else []
        f_prompts = [p for f in facts or [] if f.subject != subject for p in f.training_prompts]
        f_targets = [f.target_true for f in facts or [] if f.subject != subject for _ in f.training_prompts]
        n_facts = len(f_prompts)
        after_slots = selected_slots(model, pb) if pb else {}
        acc_after = accuracy(model, f_prompts, f_targets) if f_prompts else float("nan")
        patch.revert(model)
        before_slots = selected_slots(model, pb) if pb else {}
        acc_before = accuracy(model, f_prompts, f_targets) if f_prompts else float("nan")
        patch.apply(model)
        if pb:
            n_probe_changed = collateral(before_slots, after_slots)
            n_replaced = slots_replaced(before_slots, after_slots)
            n_select = sum(int((v == s).any(-1).sum()) for L2, v in after_slots.items() if L2 in table.layers)
        acc = (acc_before, acc_after)
    usage_info = usage.get(table.name)
    return RouteResult(
        layer=L, head=h, slot=s, subkeys=(i, j),
        slot_choice="given" if slot is not None else f"least-used slot ({usage_info[1]})",
        slot_uses=int(usage_info[0][s]) if usage_info else -1,
        moved=tuple(float(x) for x in (mem.keys.detach()[rows].float() - old_keys.float()).norm(dim=-1)),
        subkey_norms=tuple(float(x) for x in old_keys.float().norm(dim=-1)),
        rank=rank, weight=weight, target=target, p_before=p_before, p_after=logits1.softmax(-1)[want].item(),
        predicted_before=token_text(tok, int(logits0.argmax())), predicted_after=token_text(tok, int(logits1.argmax())),
        collateral=n_probe_changed, slots_replaced=n_replaced, probe_selecting_slot=n_select, facts_checked=n_facts,
        facts_accuracy_before=acc[0], facts_accuracy_after=acc[1], patch=patch)


PROBE_TEXTS = 512  # background passages whose lookups measure an adaptation's or a route's collateral


def even_sample(items: Sequence, n: int) -> list:
    """At most ``n`` of ``items``, spread evenly from the first (every len // n-th); all of them when n is 0."""
    return list(items) if n == 0 else list(items[:: max(1, len(items) // n)][:n])


def probe_texts_for(model: MemoryModel, probe: list[str] | None, probe_from: str = "--probe",
                    fallback: list[str] | None = None, n: int = PROBE_TEXTS) -> tuple[list[str], str]:
    """The probe set and where it came from: ``probe`` (the user's), else an even sample of the model's demo-world
    corpus, else a sample of ``fallback`` (the user's own text)."""
    if probe is not None:
        return probe, probe_from
    if model.meta.get("world"):
        from ..world.facts import world_of

        return even_sample(world_of(model).training_sentences(), n), "a sample of the demo world's corpus"
    if fallback:
        return even_sample(fallback, n), "the adapted text itself (no --probe given)"
    raise MemeditError("no background text to measure collateral on: pass --probe FILE (one passage per line)")
