"""Memory causal tracing (ROME's protocol, restricted to memory layers; reference §7).

Corrupt the subject's token embeddings with Gaussian noise, then restore ONE memory layer's output at ONE position
to its clean value and see how much of the answer's probability comes back:

    indirect effect (t, L) = P(target | corrupted, memory layer L restored at t) - P(target | corrupted)

P(target) is the probability of the WHOLE target, the product over its tokens with teacher forcing
(memedit/tracing/targets.py); the grid covers the prompt's positions.

Noise: ``noise`` (default 3) times the standard deviation of the token-embedding table (all entries; ROME uses the
std of subject embeddings over a corpus, which a synthetic model does not have), ``samples`` (default 10) draws
from a generator seeded with ``seed``. The same draws are reused for every (position, layer), so the grid differs
only by what is restored. All restorations run as batched forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import limits
from ..errors import MemeditError
from ..lm.hooks import memory_path, run_with_cache, run_with_hooks
from ..lm.model import MemoryModel
from ..lm.tokenizer import token_text
from ..storage.checkpoint import atomic_path
from .targets import tokenize_target
from .trace import Target, as_target


@dataclass
class CausalTrace:
    prompt: str
    tokens: list[str]  # the prompt's tokens as text, BOS first (the grid's rows)
    subject: str
    subject_positions: list[int]  # token positions that were corrupted
    target: Target
    layers: list[int]  # memory layers, the grid's columns
    clean_prob: float  # P(target) without noise
    corrupted_prob: float  # mean P(target) with the subject corrupted
    restored: torch.Tensor  # (T, n_layers): mean P(target) with one layer restored at one position
    noise_std: float
    samples: int
    seed: int

    @property
    def indirect_effect(self) -> torch.Tensor:
        """(T, n_layers): restored minus corrupted probability of the target."""
        return self.restored - self.corrupted_prob

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt, "tokens": self.tokens, "subject": self.subject,
            "subject_positions": self.subject_positions,
            "target": {"text": self.target.text, "tokens": self.target.tokens, "token_ids": self.target.token_ids,
                       "n_tokens": self.target.n_tokens, "note": self.target.note},
            "layers": self.layers, "clean_prob": self.clean_prob, "corrupted_prob": self.corrupted_prob,
            "restored": self.restored.tolist(), "indirect_effect": self.indirect_effect.tolist(),
            "noise_std": self.noise_std, "samples": self.samples, "seed": self.seed,
        }


def subject_span(model: MemoryModel, ids: list[int], subject: str) -> list[int]:
    """Token positions of ``subject`` inside the encoded prompt ``ids`` (its first occurrence)."""
    if not subject.strip():
        raise MemeditError("the subject is empty: give the words of the prompt to corrupt, e.g. --subject Reidreir")
    tok = model.tokenizer
    for variant in (" " + subject.strip(), subject.strip()):
        sub = tok.encode(variant)
        for s in range(len(ids) - len(sub) + 1):
            if sub and ids[s : s + len(sub)] == sub:
                return list(range(s, s + len(sub)))
    raise MemeditError(f"the subject {subject!r} does not occur in the prompt")


@torch.no_grad()
def causal_trace(model: MemoryModel, prompt: str, subject: str, target: str, samples: int = 10,
                 noise: float = 3.0, seed: int = 0, max_batch: int = 512) -> CausalTrace:
    """Indirect effects of restoring each memory layer's output at each position of a subject-corrupted prompt."""
    limits.count(samples, "--samples", 1, limits.MAX_CAUSAL_SAMPLES)
    limits.number(noise, "--noise", 0.0, limits.MAX_NOISE)
    limits.text(subject, "the subject")
    limits.seed(seed)
    tt = tokenize_target(model, prompt, target)
    ids = list(tt.prompt_ids)
    span = subject_span(model, ids, subject)
    tgt = as_target(model, tt, tt.note)
    seq = torch.tensor(tt.sequence)  # teacher forcing: the prompt and the target's tokens but the last
    T, S, layers = len(ids), len(seq), list(model.memory_layers)
    want_pos = torch.arange(T - 1, T - 1 + len(tt.ids))  # the positions that predict the target's tokens
    want = torch.tensor(tt.ids)

    def target_prob(logits: torch.Tensor) -> torch.Tensor:  # (B, S, vocab) -> (B,) whole-target probability
        lp = torch.log_softmax(logits[:, want_pos].float(), -1)  # (B, n, vocab)
        return lp.gather(-1, want.expand(lp.shape[0], -1).unsqueeze(-1))[..., 0].sum(-1).exp()

    logits, cache = run_with_cache(model, seq[None], [memory_path(L) for L in layers])
    clean = {L: cache[memory_path(L)][0] for L in layers}  # (S, D) each memory layer's clean output
    clean_prob = float(target_prob(logits)[0])

    std = float(model.tok_embeddings.weight.float().std()) * noise
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(span), model.config.dim, generator=g) * std  # (S, n_subj, D)
    # combination c = 0 is "corrupted, nothing restored"; c >= 1 restores (position, layer) combos[c - 1]
    combos = [(t, L) for t in range(T) for L in layers]
    rows = [(c, s) for c in range(len(combos) + 1) for s in range(samples)]
    probs = torch.empty(len(rows))
    for start in range(0, len(rows), max_batch):
        part = rows[start : start + max_batch]
        s_idx = torch.tensor([s for _, s in part])
        restore = {L: [(b, combos[c - 1][0]) for b, (c, _) in enumerate(part) if c and combos[c - 1][1] == L]
                   for L in layers}

        # the hooks run inside this iteration, so they see this iteration's s_idx and restore
        def corrupt(out, name):
            out = out.clone()
            out[:, span] += draws[s_idx].to(out.dtype)  # noqa: B023
            return out

        def restorer(L):
            def hook(out, name):
                if not restore[L]:  # noqa: B023
                    return None
                out = out.clone()
                b, t = torch.tensor(restore[L]).T  # noqa: B023
                out[b, t] = clean[L][t]
                return out

            return hook

        fwd_hooks = [("tok_embeddings", corrupt)] + [(memory_path(L), restorer(L)) for L in layers]
        logits = run_with_hooks(model, seq[None].expand(len(part), S), fwd_hooks)  # (B, S, vocab)
        probs[start : start + len(part)] = target_prob(logits)
    probs = probs.view(len(combos) + 1, samples).mean(-1)
    return CausalTrace(
        prompt=prompt, tokens=[token_text(model.tokenizer, i) for i in ids], subject=subject,
        subject_positions=span, target=tgt, layers=layers, clean_prob=clean_prob,
        corrupted_prob=float(probs[0]), restored=probs[1:].view(T, len(layers)), noise_std=std,
        samples=samples, seed=seed,
    )


def plot(ct: CausalTrace, path) -> None:
    """Save the indirect-effect grid as a PNG heat map (needs matplotlib: pip install 'memedit[plot]')."""
    try:
        import matplotlib  # lazy: optional ([plot] extra) and slow to import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: optional ([plot] extra) and slow to import
    except ImportError:
        raise MemeditError("--plot needs matplotlib: pip install 'memedit[plot]'") from None

    ie = ct.indirect_effect.numpy()
    fig, ax = plt.subplots(figsize=(2.4 + 1.2 * len(ct.layers), 1.2 + 0.35 * len(ct.tokens)))
    im = ax.imshow(ie, cmap="Purples", aspect="auto", vmin=min(0.0, float(ie.min())))
    ax.set_yticks(range(len(ct.tokens)), [
        t + ("*" if i in ct.subject_positions else "") for i, t in enumerate(ct.tokens)
    ])
    ax.set_xticks(range(len(ct.layers)), [f"layer {L}" for L in ct.layers])
    ax.set_xlabel("memory layer restored")
    ax.set_title(f"P({ct.target.text!r}) restored − corrupted\n"
                 f"clean {ct.clean_prob:.3f}, corrupted {ct.corrupted_prob:.3f}",
                 fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
