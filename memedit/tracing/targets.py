"""Targets as token sequences: how a target is tokenized after a prompt, and how it is scored.

A target (the answer a prompt should continue with) is a token *sequence*, whatever the tokenizer: a byte-level
model spells " Paris" as six bytes, a BPE model as one to four pieces. memedit scores it as ROME / CounterFact do:

- **Tokens.** The target is stripped; its tokens are those of ``encode(prompt.rstrip() + " " + target)`` that
  follow the prompt's own tokens. Where the prompt's tokens are not a prefix of that (a BPE merge across the
  boundary, a prompt ending in a space), the target's tokens are ``encode(" " + target)`` appended to the prompt's
  tokens, and :attr:`TargetTokens.joined` is False.
- **Log-probability** is the sum over the target's tokens with teacher forcing (each token scored given the prompt
  and the target's earlier tokens); ``mean_logprob`` divides it by the number of tokens. Comparisons between two
  targets (efficacy, paraphrase, neighbourhood) compare the mean per-token log-probabilities.
- **Exact match / accuracy**: every target token is the model's greedy choice under teacher forcing, i.e. greedy
  decoding from the prompt reproduces the target.
- **The model's own answer** (when no ``target_true`` is given): its greedy continuation up to the end of the first
  word, at most 16 tokens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import MemeditError
from ..lm.batching import pad_batch, pad_id
from ..lm.model import MemoryModel

MAX_ANSWER_TOKENS = 16  # the longest greedy continuation taken as the model's own answer


@dataclass(frozen=True)
class TargetTokens:
    """A prompt and a target, tokenized as the model reads them."""

    prompt: str
    text: str  # the stripped target
    prompt_ids: tuple[int, ...]  # BOS (when the tokenizer has one) + the prompt's tokens
    ids: tuple[int, ...]  # the target's tokens, scored one after another
    joined: bool  # True: the target's tokens come from encoding prompt + " " + target in one piece

    @property
    def note(self) -> str:
        """A one-line remark on how the target was tokenized (empty when nothing is remarkable)."""
        if not self.joined:
            return ("the prompt's tokens are not a prefix of prompt + ' ' + target: the target was tokenized on its "
                    "own, with a leading space")
        return ""

    @property
    def sequence(self) -> list[int]:
        """The teacher-forcing input: the prompt's tokens and every target token but the last."""
        return list(self.prompt_ids) + list(self.ids[:-1])


def _unknown_id(tok) -> int | None:
    return getattr(tok, "unk_id", None)


def tokenize_target(model: MemoryModel, prompt: str, target: str) -> TargetTokens:
    """The tokens of ``target`` as a continuation of ``prompt`` (rules in the module docstring).

    Raises a one-line :class:`MemeditError` for an empty target or one the tokenizer cannot represent.
    """
    text = (target or "").strip()
    if not text:
        raise MemeditError("the target is empty: give the answer text, e.g. --target Paris")
    prompt_ids = model.encode(prompt)
    whole = model.encode(prompt.rstrip() + " " + text)
    n = len(prompt_ids)
    if len(whole) > n and whole[:n] == prompt_ids:
        ids, joined = whole[n:], True
    else:
        ids, joined = model.tokenizer.encode(" " + text), False
    if not ids:
        raise MemeditError(f"the target {text!r} has no tokens")
    unk = _unknown_id(model.tokenizer)
    if unk is not None and unk in ids:
        raise MemeditError(f"the target {text!r} is not in the model's vocabulary (its tokenizer maps it to "
                           "the unknown token)")
    return TargetTokens(prompt=prompt, text=text, prompt_ids=tuple(prompt_ids), ids=tuple(ids), joined=joined)


@dataclass
class TargetScore:
    """How likely the model finds a target after its prompt (teacher forcing)."""

    tokens: TargetTokens
    token_logprobs: list[float]  # log P(token t | prompt, earlier target tokens), one per target token
    first_rank: int  # rank of the first target token among all next tokens (1 = top)
    greedy: bool  # every target token is the greedy choice at its position (exact match)

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        return self.logprob / len(self.token_logprobs)

    @property
    def prob(self) -> float:
        """The probability of the whole target (the product over its tokens)."""
        return math.exp(self.logprob)

    def to_dict(self) -> dict:
        return {"text": self.tokens.text, "token_ids": list(self.tokens.ids), "n_tokens": len(self.tokens.ids),
                "logprob": self.logprob, "mean_logprob": self.mean_logprob, "prob": self.prob,
                "first_rank": self.first_rank, "exact_match": self.greedy, "joined": self.tokens.joined,
                "token_logprobs": self.token_logprobs}


def _device(model: MemoryModel) -> torch.device:
    return next(model.parameters()).device


def teacher_forced(model: MemoryModel, items: Sequence[TargetTokens], batch_size: int = 256,
                   ) -> list[TargetScore]:
    """Score each (prompt, target) pair with teacher forcing, batched (right padding is safe: attention is causal)."""
    out: list[TargetScore] = []
    dev = _device(model)
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        tokens, _ = pad_batch([it.sequence for it in part], pad_id(model))
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens.to(dev)).float(), -1).cpu()  # (B, T, vocab)
        for b, it in enumerate(part):
            n0 = len(it.prompt_ids) - 1  # the position that predicts the first target token
            pos = torch.arange(n0, n0 + len(it.ids))
            want = torch.tensor(it.ids)
            rows = logp[b, pos]  # (n, vocab)
            lp = rows.gather(-1, want[:, None])[:, 0]
            first_rank = int((rows[0] > rows[0, want[0]]).sum()) + 1
            greedy = bool((rows.argmax(-1) == want).all())
            out.append(TargetScore(tokens=it, token_logprobs=lp.tolist(), first_rank=first_rank, greedy=greedy))
    return out


def score(model: MemoryModel, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 256,
          ) -> list[TargetScore]:
    """Teacher-forced scores of ``targets[i]`` after ``prompts[i]``."""
    if len(prompts) != len(targets):
        raise MemeditError(f"{len(prompts)} prompts but {len(targets)} targets")
    items = [tokenize_target(model, p, t) for p, t in zip(prompts, targets, strict=True)]
    return teacher_forced(model, items, batch_size)


def accuracy(model: MemoryModel, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 256) -> float:
    """Fraction of prompts whose greedy continuation is the whole target (exact match under teacher forcing)."""
    scores = score(model, prompts, targets, batch_size)
    return sum(s.greedy for s in scores) / len(scores) if scores else float("nan")


_WORD_END = re.compile(r"\S\s|[.,;:!?]$")


@torch.no_grad()
def greedy_answer(model: MemoryModel, prompt: str, max_tokens: int = MAX_ANSWER_TOKENS) -> str:
    """The model's own answer: its greedy continuation of ``prompt`` up to the end of the first word.

    Decoding stops before a token that starts a second word or ends the word with punctuation, at EOS, or after
    ``max_tokens`` tokens. Returns the answer text, stripped (empty if the model ends the text at once).
    """
    tok = model.tokenizer
    ids = model.encode(prompt)
    dev = _device(model)
    new: list[int] = []
    text = ""
    for _ in range(max_tokens):
        nxt = int(model(torch.tensor([ids + new], device=dev))[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        cand = tok.decode(new + [nxt])
        stripped = cand.lstrip()
        ends = bool(stripped) and _WORD_END.search(stripped) is not None
        if ends and new:
            break
        new.append(nxt)
        text = cand
        if ends:  # one token that is a whole word with its punctuation
            break
    # bytes that are not valid UTF-8 (or a character cut off at max_tokens) end the answer: it must be text that
    # tokenizes back to itself, so that it can be scored as a target
    return text.split("\ufffd")[0].strip()


def answer_or_given(model: MemoryModel, prompt: str, given: str | None) -> str:
    """``given`` when the user named the true answer, else the model's own greedy answer (one-line error if none)."""
    if given is not None and given.strip():
        return given.strip()
    ans = greedy_answer(model, prompt)
    if not ans:
        raise MemeditError(f"the model continues {prompt!r} with no word: give the old answer with --target-true")
    return ans
