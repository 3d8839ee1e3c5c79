"""The knowledge-editing field's metrics, beside memedit's own: CounterFact's (ROME / MEMIT) and EasyEdit's.

Both are taken on the model before the run (``pre``) and after it (``post``: after every edit of the run, the
state the folder is left in; memedit's own metrics are taken right after each edit), by teacher forcing, with
targets tokenized as :func:`memedit.tracing.targets.tokenize_target` does (the target after the prompt and a space,
as ROME's ``tok(f" {target}")``).

**CounterFact**, as ROME's ``compute_rewrite_quality_counterfact`` writes a case and its ``summarize.py`` reads it:

- ``*_prompts_probs``: per prompt ``{"target_new": NLL, "target_true": NLL}``, each the mean over the target's
  tokens of -log P(token | prompt, earlier target tokens);
- ``*_prompts_correct``: per prompt, whether every target token is the argmax (the new target on the rewrite and
  paraphrase prompts, the true one on the neighbourhood prompts);
- per case: success = the mean of [NLL(true) > NLL(new)] over the case's prompts (neighbourhood: [NLL(true) <
  NLL(new)]), magnitude = the mean of exp(-NLL(new)) - exp(-NLL(true)) (neighbourhood: reversed); over cases: the
  means of the per-case figures (a case without paraphrase or neighbourhood prompts is left out of that mean,
  where ROME's numpy would make it nan); score = the harmonic mean of the efficacy (rewrite), paraphrase and
  neighbourhood successes.

**EasyEdit** (``compute_edit_quality``, ``summary_metrics``):

- rel (``rewrite_acc``) and gen (``rephrase_acc``): token accuracy under teacher forcing (the share of the new
  target's tokens that are the argmax at their position), on the prompt and on each rephrasing;
- loc (``locality``): the share of the locality answers' token positions whose post-edit argmax equals the
  pre-edit argmax (teacher forcing on the locality answer). The pairs are the record's own (ZsRE ``loc`` /
  ``loc_ans``, EasyEdit ``locality_inputs``), else its neighbourhood prompts with the true target;
- over cases: the means of the per-case means.

**WILD** (live decoding, as "The Mirage of Model Editing" (2025) argues for): free greedy generation from the prompt
(and from each rephrasing), stopped at the end of sequence, a newline or the new target's length + 4 tokens; a hit
when the generated text equals the new target as normalised text (case-folded, whitespace collapsed, trailing
punctuation trimmed). Not teacher-forced: a target whose tokens all win under teacher forcing can still be missed
when the model goes on past it. ``wild`` {"rel", "gen"}: the share of hits per case, then the mean over cases.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import MemeditError
from ..lm.batching import pad_batch, pad_id
from ..lm.model import MemoryModel
from ..storage.checkpoint import atomic_write_text
from ..tracing.targets import answer_or_given, tokenize_target
from .formats import Case, safe_id

ROME_KEYS = ("rewrite", "paraphrase", "neighborhood")


@torch.no_grad()
def forced(model: MemoryModel, pairs: Sequence[tuple[str, str]], batch_size: int = 128) -> list[dict]:
    """For each (prompt, target): {"nll": per-token -log P, "argmax": the argmax token at each target position,
    "ids": the target's tokens}, by teacher forcing."""
    items = [tokenize_target(model, p, t) for p, t in pairs]
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(items), batch_size):
        part = items[s : s + batch_size]
        tokens, _ = pad_batch([it.sequence for it in part], pad_id(model))
        logp = torch.log_softmax(model(tokens.to(dev)).float(), -1).cpu()
        for b, it in enumerate(part):
            n0 = len(it.prompt_ids) - 1
            rows = logp[b, n0 : n0 + len(it.ids)]
            want = torch.tensor(it.ids)
            out.append({"nll": (-rows.gather(-1, want[:, None])[:, 0]).tolist(), "argmax": rows.argmax(-1).tolist(),
                        "ids": list(it.ids)})
    return out


def _loc_pairs(case: Case) -> list[tuple[str, str]]:
    return case.locality or [(p, case.request.target_true) for p in case.request.neighborhood]


def resolve_true(model: MemoryModel, cases: Sequence[Case]) -> None:
    """Fill in each request's empty ``target_true`` with the model's own answer (as the edit itself would), so that
    the pre-edit measurement compares with the same old answer."""
    for c in cases:
        r = c.request
        r.target_true = answer_or_given(model, r.rewrite_prompt, r.target_true)


def snapshot(model: MemoryModel, cases: Sequence[Case]) -> list[dict]:
    """Each case measured now: ROME's per-case record (``*_prompts_probs``, ``*_prompts_correct``) and EasyEdit's
    (``rewrite_acc``, ``rephrase_acc``, ``locality_output``: the argmax tokens on each locality pair)."""
    pairs: list[tuple[str, str]] = []
    plan = []
    for c in cases:
        r = c.request
        if not r.target_true.strip():
            raise MemeditError(f"case {c.case_id}: no old answer to compare with (call resolve_true first)")
        groups = {"rewrite": [r.rewrite_prompt], "paraphrase": list(r.heldout_paraphrases),
                  "neighborhood": list(r.neighborhood)}
        idx = {}
        for key, prompts in groups.items():
            idx[key] = []
            for p in prompts:
                idx[key].append((len(pairs), len(pairs) + 1))
                pairs += [(p, r.target_new), (p, r.target_true)]
        loc = []
        for p, a in _loc_pairs(c):
            loc.append(len(pairs))
            pairs.append((p, a))
        plan.append((idx, loc))
    res = forced(model, pairs)
    out = []
    for idx, loc in plan:
        rec: dict = {}
        for key in ROME_KEYS:
            rec[f"{key}_prompts_probs"] = [{"target_new": _mean(res[a]["nll"]), "target_true": _mean(res[b]["nll"])}
                                           for a, b in idx[key]]
        for key in ROME_KEYS:  # the new target's tokens all argmax; on neighbourhood prompts the true target's
            which = 1 if key == "neighborhood" else 0
            rec[f"{key}_prompts_correct"] = [res[ab[which]]["argmax"] == res[ab[which]]["ids"] for ab in idx[key]]
        rec["rewrite_acc"] = [_acc(res[a]) for a, _ in idx["rewrite"]]
        rec["rephrase_acc"] = [_acc(res[a]) for a, _ in idx["paraphrase"]]
        rec["locality_output"] = [res[i]["argmax"] for i in loc]
        out.append(rec)
    for c, rec in zip(cases, out, strict=True):
        r = c.request
        rec["wild_rewrite"] = [live(model, p, r.target_new) for p in [r.rewrite_prompt]]
        rec["wild_rephrase"] = [live(model, p, r.target_new) for p in r.heldout_paraphrases]
    return out


_TRAILING = re.compile(r"[\s.,;:!?\"'`)\]]+$")


def normalise(text: str) -> str:
    """Text as WILD compares it: case-folded, whitespace collapsed, trailing punctuation and whitespace trimmed."""
    return _TRAILING.sub("", " ".join(text.split()).casefold()).strip()


@torch.no_grad()
def live(model: MemoryModel, prompt: str, target: str) -> dict:
    """WILD's live decoding of ``prompt``: {"text": the greedy generation (stopped at EOS, a newline, or the
    target's length + 4 tokens), "hit": whether it equals ``target`` as normalised text}."""
    n = len(tokenize_target(model, prompt, target).ids) + 4
    tok = model.tokenizer
    ids = model.encode(prompt)
    dev = next(model.parameters()).device
    new: list[int] = []
    text = ""
    for _ in range(n):
        if len(ids) + len(new) >= model.config.max_seqlen:
            break
        nxt = int(model(torch.tensor([ids + new], device=dev))[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        new.append(nxt)
        text = tok.decode(new)
        if "\n" in text:
            text = text.split("\n")[0]
            break
    return {"text": text, "hit": normalise(text) == normalise(target)}


def _mean(xs: Sequence[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _acc(r: dict) -> float:
    return sum(a == b for a, b in zip(r["argmax"], r["ids"], strict=True)) / len(r["ids"])


def case_figures(pre: dict, post: dict) -> dict:
    """One case's figures from its pre- and post-edit snapshots: {"counterfact": {"pre": ..., "post": ...},
    "easyedit": {"pre": ..., "post": ...}} (None where the case has no prompts of that kind)."""
    cf = {}
    for name, rec in (("pre", pre), ("post", post)):
        d = {}
        for key in ROME_KEYS:
            probs = rec[f"{key}_prompts_probs"]
            sign = -1 if key == "neighborhood" else 1
            d[f"{key}_success"] = _mean([float(sign * (x["target_true"] - x["target_new"]) > 0) for x in probs])
            d[f"{key}_diff"] = _mean([sign * (math.exp(-x["target_new"]) - math.exp(-x["target_true"]))
                                      for x in probs])
            d[f"{key}_acc"] = _mean([float(x) for x in rec[f"{key}_prompts_correct"]])
        cf[name] = d
    ee = {name: {"rel": _mean(rec["rewrite_acc"]), "gen": _mean(rec["rephrase_acc"])}
          for name, rec in (("pre", pre), ("post", post))}
    same = [float(a == b) for p, q in zip(pre["locality_output"], post["locality_output"], strict=True)
            for a, b in zip(p, q, strict=True)]
    ee["post"]["loc"] = _mean(same)
    wild = {name: {"rel": _mean([float(x["hit"]) for x in rec["wild_rewrite"]]),
                   "gen": _mean([float(x["hit"]) for x in rec["wild_rephrase"]])} for name, rec in (("pre", pre),
                                                                                                 ("post", post))}
    return {"counterfact": cf, "easyedit": ee, "wild": wild}


def hmean(xs: Sequence[float]) -> float:
    return 0.0 if any(x <= 0 for x in xs) else len(xs) / sum(1 / x for x in xs)


def summarize(figures: Sequence[dict]) -> dict:
    """Means over cases of :func:`case_figures` (a case without a figure left out of its mean), and ROME's score."""
    out: dict = {"counterfact": {}, "easyedit": {}, "wild": {}}
    for fam in out:
        for when in ("pre", "post"):
            keys = dict.fromkeys(k for f in figures for k in f[fam][when])
            out[fam][when] = {k: _mean([f[fam][when][k] for f in figures if f[fam][when][k] is not None])
                              for k in keys}
    for when in ("pre", "post"):
        d = out["counterfact"][when]
        parts = [d.get(f"{k}_success") for k in ROME_KEYS]
        d["score"] = hmean(parts) if all(p is not None for p in parts) else None
    return out


def write_results(folder: str | Path, cases: Sequence[Case], pre: Sequence[dict], post: Sequence[dict],
                  seconds: Sequence[float]) -> list[Path]:
    """One ``case_{id}.json`` per case in ROME's result layout (``case_id``, ``requested_rewrite``, ``time``,
    ``pre``, ``post``), so that ROME's ``summarize.py`` reads a memedit run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, a, b, t in zip(cases, pre, post, seconds, strict=True):
        cid: int | str = int(c.case_id) if c.case_id.isdigit() else c.case_id
        rec = {"case_id": cid, "requested_rewrite": c.rome_rewrite(), "time": t, "pre": a, "post": b}
        p = folder / f"case_{safe_id(c.case_id)}.json"
        atomic_write_text(p, json.dumps(rec, indent=1))
        paths.append(p)
    return paths


def check_results_folder(folder: str | Path, cases: Sequence[Case]) -> Path:
    """``folder`` if the result files can go there: not a file, and one distinct file name per case."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise MemeditError(f"--results {folder} is a file: give a folder (one case_ID.json per case goes there)")
    names = [safe_id(c.case_id) for c in cases]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MemeditError(f"two cases have the id {dup!r}: --results writes one case_ID.json per case")
    return folder
