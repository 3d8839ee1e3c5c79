"""Prove lookups exact: brute-force inner-product search over all N² slot keys, compared tie-aware.

The reference is independent of memedit's lookup: it never uses the two-stage trick. Every slot s = i*N + j
gets its full key [C0_i ; C1_j] (K dims), blocks of slots are materialised on the fly and scored with one
float32 matrix product each (the blockwise ground truth of ``faiss.contrib.exhaustive_search.knn_ground_truth``,
3x faster with torch's sgemm), so the N²×K key matrix never has to exist (docs/reference.md §3, §4). A second,
independent reference is FAISS's own product-key search (``MultiIndexQuantizer``, :func:`miq_search`), and the
incremental index of ``keys adapt --exact-index`` is searched with FAISS.

Comparison (§3's caveats): the one-matmul brute force rounds differently from s1 + s2, and in low precision
many scores tie at the k-th place. And a reference can be wrong too: FAISS's MultiIndexQuantizer has returned the
same slot twice inside a tie. So the reference is checked before it judges, and a disagreement is settled by exact
scores, never by trusting either side:
  1. a reference answer holding a slot twice, an id out of range or a non-finite score is a REFERENCE FAULT; that
     query is checked again against the brute force, so the lookup is still proven;
  2. every reported score must be the true score of its slot (float64 from the slot's own key), with no slot twice;
  3. where the id sets differ, both sides are rescored exactly: a slot the reference holds that scores above the
     lookup's k-th is a LOOKUP ERROR; a slot the lookup holds that scores above the reference's k-th is a
     REFERENCE ERROR (re-checked against the brute force like a fault); otherwise the difference is a tie.
Only a confirmed lookup error fails the check. The tolerance is relative to the score scale
|q1|·max|C0| + |q2|·max|C1|.

:class:`SlotKeyIndex` keeps one head's slot keys materialised and is updated incrementally when sub-keys
change (a half-1 sub-key touches the N slots of its row, a half-2 sub-key the N slots of its column).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import limits
from ..errors import MemeditError
from ..lm.batching import pad_batch, pad_id
from ..lm.hooks import hooks, memory_path
from ..lm.memory import Lookup, MemoryLayer
from ..lm.model import MemoryModel
from ..storage.checkpoint import atomic_path, dtype_name
from ..tracing.capture import capture_lookups

BLOCK_BYTES = 64 << 20  # slot keys materialised per FAISS block (knn_ground_truth holds one more copy)
MAX_EXAMPLES = 5  # mismatches kept in full per (layer, head)
REFERENCES = ("flat", "miq")  # blockwise brute force (the default), FAISS MultiIndexQuantizer
MIQ_RTOL = 8 * float(np.finfo(np.float32).eps)  # the L2 form of an inner product rounds a few eps of the scale


def rtol_for(dtype: torch.dtype) -> float:
    """The relative score tolerance for lookups computed in ``dtype`` (a few roundings of s1, s2 and s1+s2)."""
    return max(2 * torch.finfo(dtype).eps, 2e-6)


# ---- the reference: brute force over concatenated keys ------------------------------------------------
def slot_keys(keys: np.ndarray, rows: slice = slice(None), out: np.ndarray | None = None) -> np.ndarray:
    """The full keys [C0_i ; C1_j] of the slots in sub-key rows ``rows`` of half 1, all j: (rows*N, K).

    keys: one head's sub-keys (2, N, K/2). Slot ids of the block are contiguous: i*N + j. ``out``: write there.
    """
    c0, c1 = keys[0][rows], keys[1]  # (r, K/2), (N, K/2)
    r, N, h = c0.shape[0], c1.shape[0], c1.shape[1]
    out = np.empty((r, N, 2 * h), dtype=np.float32) if out is None else out.reshape(r, N, 2 * h)
    out[:, :, :h] = c0[:, None, :]
    out[:, :, h:] = c1[None, :, :]
    return out.reshape(r * N, 2 * h)


def slot_key_blocks(keys: np.ndarray, k: int, block_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """Yield all N² slot keys of one head in order, a block of whole sub-key rows at a time."""
    N, K = keys.shape[1], 2 * keys.shape[2]
    rows = max(1, block_bytes // (N * K * 4), -(-k // N))  # a block must hold at least k slots
    for i0 in range(0, N, rows):
        yield slot_keys(keys, slice(i0, i0 + rows))


@contextlib.contextmanager
def faiss_blas() -> Iterator[None]:
    """FAISS's flat search through BLAS (sgemm, then a heap) for any number of queries inside the block.

    Below ``distance_compute_blas_threshold`` queries (128,000 in faiss-cpu 1.9+) FAISS scores a query against
    the database one vector at a time: 5x slower than sgemm for 65 queries × 32K slot keys of 512 dims here
    (0.86 s against 0.16 s, 1 thread). Both are exact; the sgemm rounds like any float32 matmul.
    """
    import faiss  # lazy: only the exact check and the key index need it

    old = faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_threshold = 1
    faiss.cvar.distance_compute_blas_database_bs = 16384
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = old


def exact_search(queries: np.ndarray, keys: np.ndarray, k: int, block_bytes: int = BLOCK_BYTES):
    """Brute-force inner-product top-k over all N² slot keys: (scores (n, k) float32, slot ids (n, k) int64).

    A block of materialised slot keys at a time (:func:`slot_key_blocks`) is scored with one float32 matrix
    product and its top-k merged into the running top-k. This is FAISS's ``knn_ground_truth`` with torch's sgemm
    in place of FAISS's flat index: at a million slots, 65 queries and K 512 it searched one head in 3.6 s where
    ``knn_ground_truth`` took 11.9 s (1 thread, the same blocks; 2.0 s of either is building the blocks).
    """
    xq = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (n, K)
    n, k = xq.shape[0], min(k, keys.shape[1] ** 2)
    best = torch.empty(n, 0), torch.empty(n, 0, dtype=torch.long)  # running (scores, slot ids), (n, <= k)
    first = 0  # the slot id of the block's first row
    for block in slot_key_blocks(keys.astype(np.float32, copy=False), k, block_bytes):
        scores = xq @ torch.from_numpy(block).T  # (n, b)
        top = scores.topk(min(k, block.shape[0]), dim=1)
        cand = torch.cat([best[0], top.values], 1), torch.cat([best[1], top.indices + first], 1)
        s, pos = cand[0].topk(min(k, cand[0].shape[1]), dim=1)
        best = s, cand[1].gather(1, pos)
        first += block.shape[0]
    return best[0].numpy(), best[1].numpy()


def miq_index(keys: np.ndarray):
    """FAISS ``MultiIndexQuantizer`` over one head's sub-keys (2, N, K/2), in the L2 form of :func:`miq_search`.

    Returns (index, M): each sub-key c gets one more coordinate sqrt(M² - |c|²), M the largest sub-key norm, so
    all have norm M; N is padded to a power of two with sub-keys (0, ..., 0, 2M) that no query can prefer.
    """
    import faiss  # lazy: only the exact check and the key index need it

    N, h = keys.shape[1], keys.shape[2]
    nbits = max(1, (N - 1).bit_length())
    c = keys.astype(np.float32)  # (2, N, K/2)
    norm2 = (c.astype(np.float64) ** 2).sum(-1)  # (2, N)
    M = float(np.sqrt(norm2.max())) or 1.0
    cent = np.zeros((2, 1 << nbits, h + 1), dtype=np.float32)
    cent[:, :N, :h] = c
    cent[:, :N, h] = np.sqrt(np.maximum(M * M - norm2, 0.0))
    cent[:, N:, h] = 2 * M
    index = faiss.MultiIndexQuantizer(2 * (h + 1), 2, nbits)
    faiss.copy_array_to_vector(cent.ravel(), index.pq.centroids)
    index.is_trained = True
    index.ntotal = 1 << (2 * nbits)
    return index, M


def miq_queries(queries: np.ndarray, M: float) -> tuple[np.ndarray, np.ndarray]:
    """(MIQ queries (n, K+2) float32, scale (n, 1)): each half-query gets a 0 and each query is scaled to norm M,
    which keeps the ranking and stops the constant terms of the L2 form from swamping the scores in float32."""
    q = np.asarray(queries, dtype=np.float64)
    n, h = q.shape[0], q.shape[1] // 2
    alpha = M / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)  # (n, 1)
    xq = np.zeros((n, 2, h + 1), dtype=np.float32)
    xq[:, :, :h] = (alpha * q).reshape(n, 2, h)
    return xq.reshape(n, 2 * (h + 1)), alpha


def miq_search(queries: np.ndarray, keys: np.ndarray, k: int, index=None):
    """FAISS ``MultiIndexQuantizer`` top-k by inner product: (scores (n, k) float32, slot ids (n, k) int64).

    A second reference, independent of the brute force: FAISS's own product-key search (multi-sequence over two
    sorted lists, Babenko & Lempitsky 2012). MIQ is L2; with every sub-key of norm M (:func:`miq_index`) and a 0
    appended to each half-query, |q_h - c|² = |q_h|² + M² - 2 q_h·c, so the L2 top-k is the inner-product top-k.
    MIQ labels hold the first half in the LOW bits. ``index``: a prebuilt ``miq_index(keys)``.
    """
    N = keys.shape[1]
    index, M = index or miq_index(keys)
    nbits = index.pq.nbits
    xq, alpha = miq_queries(queries, M)
    D, labels = index.search(xq, min(k, N * N))
    q2 = (np.asarray(queries, dtype=np.float64) ** 2).sum(1, keepdims=True)
    scores = (alpha**2 * q2 + 2 * M * M - D) / (2 * alpha)  # undo the L2 form and the scale
    i, j = labels & ((1 << nbits) - 1), labels >> nbits
    real = (labels >= 0) & (i < N) & (j < N)  # a padding sub-key is no slot: -1, an id out of range
    return scores.astype(np.float32), np.where(real, i * N + j, -1)


def true_scores(queries: np.ndarray, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """q · [C0_i ; C1_j] for given slot ids (n, m), in float64 from each slot's own key. Out-of-range ids: nan."""
    N = keys.shape[1]
    ok = (slots >= 0) & (slots < N * N)
    s = np.where(ok, slots, 0)
    i, j = s // N, s % N
    q = queries.astype(np.float64)
    key = np.concatenate([keys[0][i], keys[1][j]], axis=-1).astype(np.float64)  # (n, m, K)
    out = np.einsum("nk,nmk->nm", q, key)
    return np.where(ok, out, np.nan)


def score_scale(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """|q1|·max_i|C0_i| + |q2|·max_j|C1_j| per query (n,): a bound on |s1| + |s2| for every slot."""
    h = keys.shape[2]
    m0, m1 = np.linalg.norm(keys[0], axis=1).max(), np.linalg.norm(keys[1], axis=1).max()
    return np.linalg.norm(queries[:, :h], axis=1) * m0 + np.linalg.norm(queries[:, h:], axis=1) * m1


# ---- the comparison ---------------------------------------------------------------------------------
LOOKUP_ERROR, REFERENCE_FAULT, REFERENCE_ERROR = "lookup error", "reference fault", "reference error"


@dataclass
class Mismatch:
    """One lookup the reference contradicts (a lookup error), or one reference answer found wrong, in full."""

    layer: int
    head: int
    query: int  # row of the checked queries
    reason: str
    memedit_slots: list[int]
    memedit_scores: list[float]
    faiss_slots: list[int]  # the reference's slots (after a re-check against the brute force, if there was one)
    faiss_scores: list[float]
    true_scores: list[float]  # each memedit slot's score recomputed from its own key
    kind: str = LOOKUP_ERROR  # or REFERENCE_FAULT / REFERENCE_ERROR (then the slots are the faulty answer's)


@dataclass
class HeadReport:
    """Agreement of one (layer, head) over all checked lookups."""

    layer: int
    head: int
    lookups: int = 0
    identical: int = 0  # same slot ids, scores within tolerance
    tie_agree: int = 0  # ids differ only among slots tied at the k-th score
    mismatches: int = 0  # confirmed lookup errors (the exact rescoring shows the lookup wrong)
    ties: int = 0  # lookups where the k-th and (k+1)-th best scores tie (within tolerance)
    reference_faults: int = 0  # reference answers that cannot be a top-k: a slot twice, an id out of range, nan
    reference_errors: int = 0  # reference answers beaten by the lookup once both are rescored exactly
    rechecked: int = 0  # lookups whose faulty reference answer was replaced by the brute force's
    unproven: int = 0  # lookups that no reference could judge (the brute force itself faulty: a memedit bug)
    max_score_diff: float = 0.0  # max |memedit score - reference score| over ranks
    max_rel_diff: float = 0.0  # the same divided by the score scale
    examples: list[Mismatch] = field(default_factory=list)  # lookup errors
    faults: list[Mismatch] = field(default_factory=list)  # faulty reference answers

    @property
    def agreement(self) -> float:
        return (self.identical + self.tie_agree) / max(self.lookups, 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["agreement"] = self.agreement
        return d


def answer_faults(ids: np.ndarray, scores: np.ndarray, n_slots: int) -> list[str | None]:
    """Why each row of a reference answer (ids, scores (n, m)) cannot be a top-k, or None where it can.

    FAISS's MultiIndexQuantizer has returned the same slot twice inside a score tie (float32, 1,048,576 slots):
    such an answer says nothing about the lookup, so it must not be compared with it."""
    out: list[str | None] = [None] * ids.shape[0]
    srt = np.sort(ids, 1)
    dup = (srt[:, 1:] == srt[:, :-1]).any(1)
    bad = ((ids < 0) | (ids >= n_slots)).any(1)
    nonfinite = ~np.isfinite(scores).all(1)
    for r in np.flatnonzero(dup | bad | nonfinite):
        if dup[r]:
            twice = srt[r, 1:][srt[r, 1:] == srt[r, :-1]]
            out[r] = f"slot {int(twice[0])} returned twice"
        elif bad[r]:
            wrong = ids[r][(ids[r] < 0) | (ids[r] >= n_slots)]
            out[r] = f"slot id {int(wrong[0])} out of range 0..{n_slots - 1}"
        else:
            out[r] = "a non-finite score"
    return out


def judge(mine: np.ndarray, reported: np.ndarray, mine_true: np.ndarray, ref: np.ndarray, ref_true: np.ndarray,
          tol: float) -> tuple[str, str]:
    """(kind, reason) for one lookup against one well-formed reference answer, both rescored exactly.

    mine, reported, mine_true: the lookup's k slots, its scores and their true scores (float64 from the slots' own
    keys); ref, ref_true: the reference's k slots and their true scores. kind: "same", "tie", LOOKUP_ERROR or
    REFERENCE_ERROR. A slot that one side holds and the other lacks, scoring above the other side's k-th by more
    than ``tol``, proves the other side wrong; every real slot's score is known exactly, so neither side is trusted.
    """
    if len(np.unique(mine)) < len(mine):
        return LOOKUP_ERROR, "a slot is selected twice"
    if not (np.abs(mine_true - reported) <= tol).all():  # nan (slot out of range) -> False
        return LOOKUP_ERROR, "a reported score is not its slot's score"
    missed = ref_true[~np.isin(ref, mine)]
    if (missed > mine_true.min() + tol).any():
        return LOOKUP_ERROR, "scores differ from the exact top-k"
    extra = mine_true[~np.isin(mine, ref)]
    if (extra > ref_true.min() + tol).any():
        return REFERENCE_ERROR, "the lookup holds a slot scoring above the reference's k-th"
    return ("same" if np.array_equal(np.sort(mine), np.sort(ref)) else "tie"), ""


def _reference_top(queries: np.ndarray, keys: np.ndarray, k: int, rtol: float, block_bytes: int,
                   index: SlotKeyIndex | None, reference: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(scores (n, k+1) float64, slot ids (n, k+1), rtol) of the reference's top k+1 (one extra to see ties at the
    edge): the slot-key index when given, FAISS's MultiIndexQuantizer (its L2 form widens rtol), or brute force."""
    if index is not None:
        D, ids = index.search(queries, k + 1)
    elif reference == "miq":
        D, ids = miq_search(queries, keys, k + 1)
        rtol = max(rtol, MIQ_RTOL)
    else:
        D, ids = exact_search(queries, keys, k + 1, block_bytes)
    return D.astype(np.float64), ids, rtol


def compare_head(
    queries: np.ndarray,  # (n, K) float32, exactly the values the lookup used
    keys: np.ndarray,  # (2, N, K/2) the head's sub-keys as the lookup should have used them
    slots: np.ndarray,  # (n, k) memedit's slot ids
    scores: np.ndarray,  # (n, k) memedit's scores
    rtol: float,
    report: HeadReport,
    block_bytes: int = BLOCK_BYTES,
    index: SlotKeyIndex | None = None,
    reference: str = "flat",
) -> HeadReport:
    """Check memedit's top-k against a reference for one head, adding the counts to ``report``.

    The reference is the blockwise brute force, or ``index`` (materialised slot keys) when given, or with
    ``reference="miq"`` FAISS's MultiIndexQuantizer (:func:`miq_search`, whose L2 form widens ``rtol`` by a few
    float32 eps). The reference is checked before it judges: an answer that cannot be a top-k (a slot twice, an id
    out of range, a non-finite score) is a reference fault, and that query is checked again against the brute
    force. Every disagreement is rescored exactly (float64 from the slots' own keys) and classified as a lookup
    error, a reference error (then re-checked against the brute force too) or a tie.
    """
    n, k = slots.shape
    if n == 0:
        return report
    if reference not in REFERENCES:
        raise MemeditError(f"unknown reference {reference!r} (choose from {', '.join(REFERENCES)})")
    n_slots = keys.shape[1] ** 2
    brute = index is None and reference == "flat"  # the reference is already the brute force
    D, ids, rtol = _reference_top(queries, keys, k, rtol, block_bytes, index, reference)
    tol = rtol * score_scale(queries, keys)  # (n,)
    truth = true_scores(queries, keys, slots)  # (n, k)
    faults = answer_faults(ids, D, n_slots)
    kinds = np.array(["same"] * n, dtype=object)
    # the common case, decided without rescoring the reference: same slot set, consistent scores, no fault
    same = (np.sort(slots, 1) == np.sort(ids[:, :k], 1)).all(1)
    consistent = (np.abs(truth - scores) <= tol[:, None]).all(1)
    fine = same & consistent & np.array([f is None for f in faults])
    recheck: list[int] = []
    for r in np.flatnonzero(~fine):
        if faults[r] is not None:
            kind, reason = REFERENCE_FAULT, faults[r]
            report.reference_faults += 1
        else:
            ref_true = true_scores(queries[r : r + 1], keys, ids[r : r + 1, :k])[0]
            kind, reason = judge(slots[r], scores[r], truth[r], ids[r, :k], ref_true, tol[r])
            if kind == REFERENCE_ERROR:
                report.reference_errors += 1
        kinds[r] = kind
        if kind in (REFERENCE_FAULT, REFERENCE_ERROR):
            recheck.append(int(r))
            if len(report.faults) < MAX_EXAMPLES:
                report.faults.append(Mismatch(
                    report.layer, report.head, int(r), reason, slots[r].tolist(), [float(x) for x in scores[r]],
                    ids[r, :k].tolist(), [float(x) for x in D[r, :k]], [float(x) for x in truth[r]], kind))
        elif kind == LOOKUP_ERROR and len(report.examples) < MAX_EXAMPLES:
            report.examples.append(Mismatch(
                report.layer, report.head, int(r), reason, slots[r].tolist(), [float(x) for x in scores[r]],
                ids[r, :k].tolist(), [float(x) for x in D[r, :k]], [float(x) for x in truth[r]]))
    if recheck:  # a faulty reference proves nothing: judge those lookups by the brute force
        rows = np.array(recheck)
        if brute:
            kinds[rows] = "unproven"
        else:
            D2, ids2 = exact_search(queries[rows], keys, k + 1, block_bytes)
            D[rows], ids[rows] = D2, ids2
            report.rechecked += len(rows)
            faults2 = answer_faults(ids2, D2, n_slots)
            for x, r in enumerate(rows):
                if faults2[x] is not None:
                    kinds[r] = "unproven"
                    continue
                ref_true = true_scores(queries[r : r + 1], keys, ids2[x : x + 1, :k])[0]
                kind, reason = judge(slots[r], scores[r], truth[r], ids2[x, :k], ref_true, tol[r])
                kinds[r] = "unproven" if kind == REFERENCE_ERROR else kind
                if kind == LOOKUP_ERROR and len(report.examples) < MAX_EXAMPLES:
                    report.examples.append(Mismatch(
                        report.layer, report.head, int(r), reason, slots[r].tolist(), [float(x) for x in scores[r]],
                        ids2[x, :k].tolist(), [float(x) for x in D2[x, :k]], [float(x) for x in truth[r]]))
    report.lookups += n
    report.identical += int((kinds == "same").sum())
    report.tie_agree += int((kinds == "tie").sum())
    report.mismatches += int((kinds == LOOKUP_ERROR).sum())
    report.unproven += int((kinds == "unproven").sum())
    ok = (kinds == "same") | (kinds == "tie")
    if D.shape[1] > k:
        report.ties += int((D[ok, k] >= D[ok, k - 1] - tol[ok]).sum())
    if ok.any():
        mine = np.sort(scores[ok].astype(np.float64), axis=1)[:, ::-1]  # (m, k) descending
        ref = np.sort(D[ok, :k], axis=1)[:, ::-1]
        diff = np.abs(mine - ref)
        report.max_score_diff = max(report.max_score_diff, float(diff.max()))
        scale = np.maximum(tol[ok] / rtol, 1e-30)
        report.max_rel_diff = max(report.max_rel_diff, float((diff.max(1) / scale).max()))
    return report


# ---- collecting lookups to check ----------------------------------------------------------------------
@dataclass
class Checked:
    """The queries one layer's lookup received and what it returned, ready for comparison."""

    queries: torch.Tensor  # (n, H, K) in the compute dtype
    lookup: Lookup  # n lookups
    keys: torch.Tensor  # (H, 2, N, K/2) the layer's sub-keys in the compute dtype (from the parameter)


def check_layer_knn(layer: MemoryLayer, L: int) -> None:
    N, k = layer.cfg.n_keys, layer.search.knn
    if k > N:
        raise MemeditError(f"layer {L}: knn {k} > N {N}: a two-stage lookup with k > N is not exact; fix the config")


def search_queries(model: MemoryModel, queries: dict[int, torch.Tensor], dtype: torch.dtype) -> dict[int, Checked]:
    """Run the one lookup (``layer.search``) on given query vectors {layer: (n, H, K)}."""
    out = {}
    layers = model.memory_layers
    with torch.no_grad():
        for L, q in queries.items():
            if L not in layers:
                raise MemeditError(f"layer {L} is not a memory layer (memory layers: {list(layers)})")
            layer = layers[L]
            check_layer_knn(layer, L)
            c = layer.cfg
            if q.dim() != 3 or tuple(q.shape[1:]) != (c.heads, c.k_dim):
                raise MemeditError(f"layer {L} queries have shape {tuple(q.shape)}; expected (n, {c.heads}, {c.k_dim})")
            q = q.to(dtype)
            keys = layer.keys4d.to(dtype)
            out[L] = Checked(q, layer.search(q, keys), keys)
    return out


def corpus_queries(model: MemoryModel, texts: Sequence[str], limit: int = 0,
                   batch_size: int = 64) -> dict[int, Checked]:
    """Run the model on ``texts`` and record every memory layer's queries and lookups at real token positions.

    Duplicate queries (same prefix) are checked once; ``limit`` > 0 stops after that many distinct lookups.
    """
    seqs = [model.encode(t) for t in texts if t.strip()]
    if not seqs:
        raise MemeditError("the corpus tokenizes to nothing: give a file with text lines")
    for L, layer in model.memory_layers.items():
        check_layer_knn(layer, L)
    pad = pad_id(model)
    got: dict[int, list[tuple[torch.Tensor, Lookup]]] = {L: [] for L in model.memory_layers}
    seen: dict[int, set[bytes]] = {L: set() for L in model.memory_layers}
    queries: dict[int, list[torch.Tensor]] = {L: [] for L in model.memory_layers}
    fwd_hooks = [(f"{memory_path(L)}.hook_query", lambda q, name, L=L: queries[L].append(q.detach()))
                 for L in model.memory_layers]
    with hooks(model, fwd_hooks):
        with torch.no_grad(), capture_lookups(model) as rec:
            for start in range(0, len(seqs), batch_size):
                tokens, lengths = pad_batch(seqs[start : start + batch_size], pad)
                B, T = tokens.shape
                model(tokens)
                valid = (torch.arange(T)[None, :] < lengths[:, None]).reshape(-1)  # (B*T,)
                for L in model.memory_layers:
                    q, lk = queries[L].pop(), rec[L].pop()
                    keep = []
                    for r in valid.nonzero().flatten().tolist():
                        b = q[r].float().numpy().tobytes()
                        if b not in seen[L]:
                            seen[L].add(b)
                            keep.append(r)
                    idx = torch.tensor(keep, dtype=torch.long)
                    got[L].append((q[idx], Lookup(**{f: v[idx] for f, v in lk.__dict__.items()})))
                if limit and min(len(s) for s in seen.values()) >= limit:
                    break
    out = {}
    for L, parts in got.items():
        q = torch.cat([p[0] for p in parts])
        lk = Lookup(**{f: torch.cat([p[1].__dict__[f] for p in parts]) for f in Lookup.__dataclass_fields__})
        if limit:
            q, lk = q[:limit], Lookup(**{f: v[:limit] for f, v in lk.__dict__.items()})
        out[L] = Checked(q, lk, model.memory_layers[L].keys4d.detach().to(q.dtype))
    return out


# ---- the whole check ----------------------------------------------------------------------------------
@dataclass
class PassReport:
    """One pass (one compute dtype) over all memory layers and heads."""

    dtype: str
    rtol: float
    heads: list[HeadReport]

    @property
    def mismatches(self) -> int:
        return sum(h.mismatches for h in self.heads)

    @property
    def lookups(self) -> int:
        return sum(h.lookups for h in self.heads)

    def total(self, name: str) -> int:
        """A HeadReport count summed over the heads ("reference_faults", "unproven", ...)."""
        return sum(getattr(h, name) for h in self.heads)

    def to_json(self) -> dict:
        n = max(self.lookups, 1)
        return {
            "dtype": self.dtype, "rtol": self.rtol, "lookups": self.lookups, "mismatches": self.mismatches,
            **{c: self.total(c) for c in ("reference_faults", "reference_errors", "rechecked", "unproven")},
            "identical": sum(h.identical for h in self.heads) / n,
            "tie_agree": sum(h.tie_agree for h in self.heads) / n,
            "ties": sum(h.ties for h in self.heads),
            "heads": [h.to_json() for h in self.heads],
        }


@dataclass
class VerifyReport:
    source: str  # where the queries came from
    passes: list[PassReport]

    @property
    def ok(self) -> bool:
        """True when no lookup error is confirmed and every lookup was judged (reference faults are not the
        lookup's: those queries were proven against the brute force)."""
        return all(p.mismatches == 0 and p.total("unproven") == 0 for p in self.passes)

    def to_json(self) -> dict:
        return {"source": self.source, "ok": self.ok, "passes": [p.to_json() for p in self.passes]}


def compare(
    checked: dict[int, Checked],
    rtol: float,
    block_bytes: int = BLOCK_BYTES,
    indexes: dict[int, list[SlotKeyIndex]] | None = None,
    reference: str = "flat",
    on_head: Callable[[], None] | None = None,
) -> list[HeadReport]:
    """Compare every (layer, head) of captured lookups with the reference (blockwise brute force, FAISS's MIQ, or
    the kept ``indexes``); ``on_head()`` is called after each head."""
    out = []
    for L, c in checked.items():
        keys = c.keys.detach().float().cpu().numpy()  # (H, 2, N, K/2)
        q = c.queries.detach().float().cpu().numpy()  # (n, H, K)
        for h in range(q.shape[1]):
            rep = HeadReport(L, h)
            compare_head(np.ascontiguousarray(q[:, h]), keys[h], c.lookup.indices[:, h].cpu().numpy(),
                         c.lookup.scores[:, h].float().cpu().numpy(), rtol, rep, block_bytes,
                         index=indexes[L][h] if indexes else None, reference=reference)
            out.append(rep)
            if on_head is not None:
                on_head()
    return out


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Pin FAISS (and torch) to ``n`` threads inside the block: results differ in the last bits between counts."""
    import faiss  # lazy: only the exact check and the key index need it

    old_f, old_t = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old_f)
        torch.set_num_threads(old_t)


def in_dtype(model: MemoryModel, dtype: torch.dtype) -> MemoryModel:
    """The model itself if it computes in ``dtype``, else a copy that computes in ``dtype`` and shares the value
    tables as stored: the lookup reads rows and upcasts what it reads (``MemoryLayer.read``), so a million-slot
    table is neither copied nor converted."""
    if model.dtype == dtype:
        return model
    tables = [t.weight for t in model.tables]
    m = copy.deepcopy(model, memo={id(w): w for w in tables})  # the hooked search modules come along
    shared = {id(w) for w in tables}
    with torch.no_grad():
        for mod in m.modules():
            for t in [*mod._parameters.values(), *mod._buffers.values()]:
                if t is not None and id(t) not in shared and t.is_floating_point():
                    t.data = t.data.to(dtype)
    return m


def verify(
    model: MemoryModel,
    source: Callable[[MemoryModel, torch.dtype], dict[int, Checked]],
    source_name: str,
    dtypes: Sequence[torch.dtype],
    threads: int = 1,
    block_bytes: int = BLOCK_BYTES,
    progress: Callable[[int, int], None] | None = None,
    reference: str = "flat",
) -> VerifyReport:
    """Run ``source`` (which makes lookups through the model's one lookup) once per dtype and compare with FAISS.

    ``source(model, dtype)`` computes in ``dtype`` itself: query vectors only need the sub-keys cast, text needs a
    copy of the model in that dtype (:func:`in_dtype`). ``progress(heads compared, heads in all passes)`` is called
    after each head."""
    passes, done, total = [], 0, 0

    def head_done() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    limits.count(threads, "--threads", 1, limits.MAX_THREADS)
    with faiss_threads(threads):
        for dt in dtypes:
            checked = source(model, dt)
            total = len(dtypes) * sum(c.queries.shape[1] for c in checked.values())  # heads in all passes
            passes.append(PassReport(dtype_name(dt), rtol_for(dt), compare(checked, rtol_for(dt), block_bytes,
                                                                       reference=reference, on_head=head_done)))
    return VerifyReport(source_name, passes)


def corpus_source(texts: Sequence[str], limit: int = 0) -> Callable[[MemoryModel, torch.dtype], dict[int, Checked]]:
    limits.count(limit, "--limit", 0, limits.MAX_VERIFY_LIMIT)
    return lambda m, dt: corpus_queries(in_dtype(m, dt), texts, limit)


def random_source(n: int, layers: Sequence[int] | None = None, seed: int = 0):
    """Gaussian query vectors (n, H, K) per memory layer; no tokenizer needed."""
    limits.count(n, "--random", 1, limits.MAX_RANDOM_QUERIES)
    limits.seed(seed)

    def make(m: MemoryModel, dt: torch.dtype) -> dict[int, Checked]:
        g = torch.Generator().manual_seed(seed)
        qs = {}
        for L, layer in m.memory_layers.items():
            if layers and L not in layers:
                continue
            qs[L] = torch.randn(n, layer.cfg.heads, layer.cfg.k_dim, generator=g)
        return search_queries(m, qs, dt)

    return make


def saved_source(queries: dict[int, torch.Tensor]):
    return lambda m, dt: search_queries(m, queries, dt)


def load_queries(path: str, model: MemoryModel, layer: int | None = None) -> dict[int, torch.Tensor]:
    """Saved query vectors: a .npy array (n, H, K) for one layer (``layer``, or the only memory layer), or an
    .npz with one array per layer named "layer{L}"."""
    p = Path(path)
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MemeditError(f"cannot read query vectors from {p}: {e}") from None
    layers = list(model.memory_layers)
    if isinstance(data, np.ndarray):
        if layer is None:
            if len(layers) != 1:
                raise MemeditError(f"{p} holds one layer's queries; say which with --layer (memory layers: {layers})")
            layer = layers[0]
        return {layer: torch.from_numpy(np.asarray(data, dtype=np.float32))}
    out = {}
    for name in data.files:
        if not name.startswith("layer") or not name[5:].isdigit():
            raise MemeditError(f"{p}: array {name!r} is not named layer{{L}}")
        if layer is None or int(name[5:]) == layer:
            out[int(name[5:])] = torch.from_numpy(np.asarray(data[name], dtype=np.float32))
    if not out:
        raise MemeditError(f"{p} holds no queries for layer {layer}")
    return out


def save_queries(path: str, checked: dict[int, Checked]) -> None:
    """Write captured queries as an .npz with one float32 array (n, H, K) per layer, named "layer{L}"."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"layer{L}": c.queries.float().cpu().numpy() for L, c in checked.items()})


# ---- the incremental exact index ------------------------------------------------------------------------
class SlotKeyIndex:
    """One head's N² slot keys materialised as a float32 buffer (N², K), searched exactly with FAISS.

    It follows the sub-keys incrementally: a changed half-1 sub-key i rewrites only the N slots of its row
    (i*N .. i*N+N-1), a changed half-2 sub-key j only the N slots of its column (j, N+j, 2N+j, ...).
    """

    def __init__(self, keys: np.ndarray):
        self.subkeys = np.array(keys, dtype=np.float32)  # (2, N, K/2), the copy the buffer was built from
        self.n_keys, self.half = self.subkeys.shape[1], self.subkeys.shape[2]
        self.keys = slot_keys(self.subkeys)  # (N², K)

    def set_subkey(self, half: int, i: int, vector: np.ndarray) -> int:
        """Replace sub-key ``i`` of ``half`` and rewrite the slots it touches; returns how many (N)."""
        N, h = self.n_keys, self.half
        if not (half in (0, 1) and 0 <= i < N):
            raise MemeditError(f"sub-key ({half}, {i}) is out of range: half 0 or 1, id 0..{N - 1}")
        self.subkeys[half, i] = vector
        if half == 0:
            self.keys[i * N : (i + 1) * N, :h] = self.subkeys[0, i]  # row i: slots i*N + j
        else:
            self.keys[i::N, h:] = self.subkeys[1, i]  # column j: slots i*N + j for every i
        return N

    def sync(self, keys: np.ndarray) -> int:
        """Slots rewritten bringing the buffer in step with ``keys`` (2, N, K/2), touching only changed sub-keys."""
        keys = np.asarray(keys, dtype=np.float32)
        changed = np.argwhere((keys != self.subkeys).any(-1))  # (m, 2): (half, id)
        return sum(self.set_subkey(int(half), int(i), keys[half, i]) for half, i in changed)

    def rebuild(self) -> None:
        """Rewrite every slot from the sub-keys (what an update avoids)."""
        slot_keys(self.subkeys, out=self.keys)

    def search(self, queries: np.ndarray, k: int):
        """Exact inner-product top-k over the buffer: (scores (n, k), slot ids (n, k))."""
        import faiss  # lazy: only the exact check and the key index need it

        xq = np.ascontiguousarray(queries, dtype=np.float32)
        with faiss_blas():
            return faiss.knn(xq, self.keys, min(k, self.keys.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)


def layer_indexes(layer: MemoryLayer) -> list[SlotKeyIndex]:
    """A :class:`SlotKeyIndex` per head of a memory layer, built from its current sub-keys."""
    keys = layer.keys4d.detach().float().cpu().numpy()
    return [SlotKeyIndex(keys[h]) for h in range(keys.shape[0])]


def sync_indexes(indexes: list[SlotKeyIndex], layer: MemoryLayer) -> int:
    """Update each head's index for the layer's changed sub-keys; returns the slots rewritten."""
    keys = layer.keys4d.detach().float().cpu().numpy()
    return sum(ix.sync(keys[h]) for h, ix in enumerate(indexes))


def saving_queries(source: Callable, path: str) -> Callable:
    """``source`` that also writes the queries it gives for its first pass (the first dtype) to ``path`` (.npz)."""
    first = True

    def saving(model, dtype):
        nonlocal first
        checked = source(model, dtype)
        if first:
            save_queries(path, checked)
            first = False
        return checked

    return saving
