"""Change the sub-keys: online sparse adaptation on a text stream, and routing a new fact to a free slot.

Both write a reversible :class:`KeyPatch` (old and new rows of the tensors they touched, with checksums) and
apply it to the model folder atomically. Sub-key rows are rows of a layer's ``keys`` tensor (2*H*N, K/2):
row = h*2N + half*N + i. Frozen sub-keys are listed in the model folder's ``memedit/frozen.safetensors``
under "keys.layer{L}" (row ids of that layer's ``keys``); nothing here changes them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import MemeditError
from .model import MemoryModel

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

        from .checkpoint import atomic_path

        tensors, meta = {}, {"format": PATCH_FORMAT, "version": PATCH_VERSION, **self.meta}
        for name, c in self.changes.items():
            tensors.update({f"{name}.rows": c.rows, f"{name}.old": c.old, f"{name}.new": c.new})
            meta[f"sha256.{name}.old"], meta[f"sha256.{name}.new"] = _sha(c.old), _sha(c.new)
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "KeyPatch":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise MemeditError(f"patch file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise MemeditError(f"{path} is not a readable patch ({e})") from None
        if meta.get("format") != PATCH_FORMAT:
            raise MemeditError(f"{path} is not a memedit key patch")
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

    def _swap(self, model: MemoryModel, expect: str, put: str) -> None:
        params = dict(model.state_dict(keep_vars=True))
        for name, c in self.changes.items():  # check everything before changing anything
            if name not in params:
                raise MemeditError(f"the model has no tensor {name}; this patch is for another model")
            p = params[name]
            if c.rows.numel() and (c.rows.max() >= p.shape[0] or c.rows.min() < 0 or c.old.shape[1:] != p.shape[1:]):
                raise MemeditError(f"the patch's rows of {name} do not fit the model's {tuple(p.shape)}")
            if not torch.equal(p.data[c.rows].to(c.old.dtype), getattr(c, expect)):
                state = "not applied" if expect == "new" else "already applied, or the rows changed since"
                raise MemeditError(f"{name}: the model's rows do not match the patch ({state}); nothing was changed")
        with torch.no_grad():
            for name, c in self.changes.items():
                params[name].data[c.rows] = getattr(c, put).to(params[name].dtype)

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


def write_weights(model: MemoryModel) -> None:
    """Rewrite the model folder's model.safetensors from the model, atomically."""
    from safetensors.torch import save_file

    from .checkpoint import FORMAT, atomic_path, native_state, require_writable

    require_writable(model)
    with atomic_path(Path(model.source) / "model.safetensors") as tmp:
        save_file(native_state(model), str(tmp), metadata={"format": FORMAT})


def default_patch_path(model: MemoryModel, kind: str) -> Path:
    from .checkpoint import state_dir
    from .state import PATCHES

    return state_dir(model, create=True) / PATCHES / f"keys-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"


def save_and_apply(model: MemoryModel, patch: KeyPatch, out: str | Path | None, kind: str) -> Path:
    """Save the patch (the model already holds its new rows), then rewrite the model folder. Returns the patch path."""
    from .checkpoint import require_writable

    require_writable(model)
    path = patch.save(out or default_patch_path(model, kind))
    write_weights(model)
    return path


# ---- frozen sub-keys -------------------------------------------------------------------------------------
def frozen_key_rows(model: MemoryModel) -> dict[int, torch.Tensor]:
    """{layer: bool mask over its ``keys`` rows (2*H*N,)} of frozen sub-keys."""
    from .state import frozen_rows

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
def token_batches(model: MemoryModel, texts: Sequence[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens (B, T), valid (B, T) bool) batches of BOS + text (+ EOS), right-padded."""
    from .evaluate import pad_batch

    tok = model.tokenizer
    if tok is None:
        raise MemeditError("this model has no tokenizer: text commands need one")
    seqs = []
    for t in texts:
        if t.strip():
            ids = model.encode(t)
            seqs.append(ids + ([tok.eos_id] if tok.eos_id is not None else []))
    if not seqs:
        raise MemeditError("the text tokenizes to nothing: give a file with text lines")
    pad = tok.pad_id if tok.pad_id is not None else 0
    out = []
    for start in range(0, len(seqs), batch_size):
        tokens, lengths = pad_batch(seqs[start : start + batch_size], pad)
        out.append((tokens, torch.arange(tokens.shape[1])[None, :] < lengths[:, None]))
    return out


def lm_loss(model: MemoryModel, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real (non-pad) targets."""
    logits = model(tokens[:, :-1])  # (B, T-1, vocab)
    mask = valid[:, 1:]
    return F.cross_entropy(logits[mask].float(), tokens[:, 1:][mask])


@torch.no_grad()
def text_loss(model: MemoryModel, batches) -> float:
    """Token-weighted mean loss over batches."""
    total, count = 0.0, 0
    for tokens, valid in batches:
        n = int(valid[:, 1:].sum())
        total += lm_loss(model, tokens, valid).item() * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def selected_slots(model: MemoryModel, batches) -> dict[int, torch.Tensor]:
    """Each real position's selected slots, sorted per head: {layer: (n_positions, H, k)}."""
    from .capture import capture_lookups

    out: dict[int, list[torch.Tensor]] = {L: [] for L in model.memory_layers}
    for tokens, valid in batches:
        with capture_lookups(model) as rec:
            model(tokens)
        for L, (lk,) in rec.items():
            out[L].append(lk.indices[valid.reshape(-1)].sort(-1).values)
    return {L: torch.cat(v) for L, v in out.items()}


def collateral(before: dict[int, torch.Tensor], after: dict[int, torch.Tensor]) -> float:
    """Fraction of probe lookups (position, layer, head) whose set of selected slots changed."""
    changed = total = 0
    for L in before:
        diff = (before[L] != after[L]).any(-1)  # (n, H)
        changed += int(diff.sum())
        total += diff.numel()
    return changed / max(total, 1)


# ---- keys adapt ----------------------------------------------------------------------------------------
@dataclass
class AdaptStep:
    step: int
    loss: float  # the batch's loss before this step's update
    subkeys_changed: int  # sub-keys this step moved (entered a stage-1 top-k, got a gradient, not frozen)
    collateral: float  # fraction of probe lookups whose selected slots differ from before adaptation
    slots_reindexed: int  # slot keys rewritten in the incremental exact index


@dataclass
class AdaptResult:
    steps: list[AdaptStep]
    loss_before: float  # mean loss over the adapted text before any step
    loss_after: float
    probe_loss_before: float  # mean loss over the probe (background) text
    probe_loss_after: float
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
    lr: float = 1.0,
    layers: Sequence[int] | None = None,
    check_exact: bool = True,
    progress: Callable[[AdaptStep], None] | None = None,
) -> AdaptResult:
    """Online sparse adaptation of the sub-keys on ``texts``: each step (one batch, SGD on the LM loss) moves only
    sub-keys that entered a stage-1 top-k in that batch; frozen sub-keys and every other parameter stay fixed."""
    from . import exact
    from .capture import capture_lookups

    layers = list(layers or model.memory_layers)
    for L in layers:
        if L not in model.memory_layers:
            raise MemeditError(f"layer {L} is not a memory layer (memory layers: {list(model.memory_layers)})")
    mem = {L: model.memory_layers[L] for L in layers}
    frozen = frozen_key_rows(model)
    batches = token_batches(model, texts, batch_size)
    probe_batches = token_batches(model, probe, 64)
    before = {keys_name(L): m.keys.detach().clone() for L, m in mem.items()}
    loss_before, probe_loss_before = text_loss(model, batches), text_loss(model, probe_batches)
    probe_slots = selected_slots(model, probe_batches)
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
            st = AdaptStep(step + 1, loss.item(), n_changed, collateral(probe_slots, selected_slots(model, probe_batches)),
                           reindexed)
            history.append(st)
            if progress:
                progress(st)
    finally:
        for m in mem.values():
            m.keys.requires_grad_(False)
            m.keys.grad = None
    n_exact = n_bad = 0
    if check_exact:
        checked = exact.corpus_queries(model, probe, limit=2048)
        heads = exact.compare({L: checked[L] for L in mem}, exact.rtol_for(model.dtype), indexes=indexes)
        n_exact, n_bad = sum(h.lookups for h in heads), sum(h.mismatches for h in heads)
    patch = diff_patch(before, model, {"command": "keys adapt", "steps": str(steps), "lr": str(lr),
                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return AdaptResult(
        history, loss_before, text_loss(model, batches), probe_loss_before, text_loss(model, probe_batches),
        sum(int(v.sum()) for v in changed_any.values()), sum(m.keys.shape[0] for m in mem.values()),
        sum(int(v.sum()) for v in skipped.values()), n_exact, n_bad, patch)
