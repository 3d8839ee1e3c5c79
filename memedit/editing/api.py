"""``memedit.edit``: one call in the shape of EasyEdit's ``BaseEditor.edit``, committing through the model folder.

    import memedit
    m = memedit.load("./my-model")
    out = memedit.edit(m, prompts=["Koutein owns a well-worn"], target_new=["harp"], subject=["Koutein"],
                       ground_truth=["drums"], rephrase_prompts=["Koutein practices the"],
                       locality_inputs={"neighborhood": {"prompt": ["Pumax practices the"],
                                                         "ground_truth": ["drums"]}},
                       sequential_edit=True)
    out["summary"]["easyedit"]["post"]   # {"rel": ..., "gen": ..., "loc": ...}

The arguments are read as an EasyEdit record (memedit/editing/formats.py); the edits run as ``memedit edit`` runs
them (:func:`memedit.editing.sparse_ft.run_edits`: background ranking, the locality guard, the subject's other facts
kept), each committed edit applied to the folder as a patch (``memedit patch revert ID`` undoes it), and measured
as the CLI measures them: memedit's metrics right after each edit, CounterFact's and EasyEdit's before and after the
run (memedit/editing/field_metrics.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import MemeditError, RowsChanged
from ..storage.checkpoint import load, require_writable
from ..storage.patch import labelled
from ..storage.store import writable_tensors
from ..world.facts import load_facts, world_of
from . import background as B
from . import field_metrics as FM
from . import locality as L
from . import sparse_ft as S
from .consolidate import Mentions, consolidate
from .formats import Case, _easyedit
from .patch import Patch, applied_ids, apply, find_patch, write_rows


def cases_of(prompts, target_new, ground_truth=None, subject=None, rephrase_prompts=None,
             locality_inputs=None) -> list[Case]:
    """EasyEdit's edit arguments as cases (the rules of a JSON EasyEdit record)."""
    d = {"prompts": prompts, "target_new": target_new, "ground_truth": ground_truth, "subject": subject,
         "rephrase_prompts": rephrase_prompts, "locality_inputs": locality_inputs}
    try:
        return _easyedit({k: v for k, v in d.items() if v is not None}, 0)
    except MemeditError as e:
        raise MemeditError(f"memedit.edit: {e}") from None


def setup(m, reqs, cfg, locality: str | Path | None = None, facts: str | Path | None = None):
    """(background statistics or None, known facts or None, the Locality) for editing ``reqs`` on ``m``: what
    `memedit edit` and :func:`run_cases` both need before :func:`memedit.editing.sparse_ft.run_edits`. Refuses, in
    one line, a target the tokenizer cannot spell and a model without a locality sample."""
    bg = B.get(m) if cfg.ranking != "counts" else None
    world = load_facts(facts) if facts is not None else (world_of(m).facts if m.meta.get("world") else None)
    S.fact_items(m, reqs)  # every target tokenizes: said before anything else is asked of the folder
    texts = L.sample_for(m, locality, bg.locality if bg is not None else B.stored_locality(m), cfg.locality_tokens)
    if texts is None:
        raise MemeditError("no locality sample to measure the edit's collateral on: run `memedit background CORPUS` "
                           "(it keeps a sample of CORPUS) or pass --locality FILE")
    return bg, world, L.Locality(m, texts)


def consolidation_sample(m, reqs, cfg, bg, sequential: bool, locality: str | Path | None = None):
    """The Locality of consolidation passes (memedit/editing/consolidate.py) for a sequential run of ``reqs``, or
    None: a run shorter than ``cfg.consolidate_every`` edits makes no pass (the sample is not even read), and a
    model without a consolidation sample (background statistics from before it was kept, no demo world, no
    ``--locality FILE``) makes none."""
    if not sequential or not cfg.consolidate_every or len(reqs) < cfg.consolidate_every:
        return None
    texts = consolidation_texts(m, cfg, bg, locality)
    return L.Locality(m, texts) if texts is not None else None


def consolidation_texts(m, cfg, bg, locality: str | Path | None = None) -> list[str] | None:
    """The texts of consolidation passes: ``cfg.consolidate_tokens`` of ``--locality FILE``, else the sample the
    stored background statistics keep, else the demo world's sentences; None when there is none."""
    if locality is not None:
        return L.draw_sample(m, L.read_locality(locality), cfg.consolidate_tokens, seed=1)
    if bg is not None and bg.consolidation:
        return bg.consolidation
    if m.meta.get("world"):
        return L.draw_sample(m, world_of(m).training_sentences(), cfg.consolidate_tokens, seed=1)
    return None


def consolidate_folder(model, cfg=None, locality: str | Path | None = None, dry_run: bool = False) -> dict:
    """`memedit consolidate`: one consolidation pass (memedit/editing/consolidate.py) over the fact edits applied to
    the folder since its last pass (or since its first patch), for edits made one `memedit edit` call at a time.

    The reference is the folder as it was before those edits: every patch applied since the last pass is undone in
    memory, latest first (each must find its new rows in place: refused in one line otherwise), the sample's
    reference taken, and the patches redone. Only rows that those edits trained are trained; every edit answer the
    folder keeps is kept. Returns the report as JSON (``patch``: the committed patch's id, or None); the pass is
    applied to the folder (one revertible patch, kind ``consolidate``) when it gives back more than it takes and
    loses no answer, unless ``dry_run``."""
    m = model if hasattr(model, "tables") else load(model)
    cfg = cfg if cfg is not None else S.EditConfig()
    if not dry_run:
        require_writable(m)
    window: list[Patch] = []
    for pid in reversed(applied_ids(m)):
        p = find_patch(m, pid)
        if p.kind == "consolidate":
            break
        window.append(p)
    window.reverse()
    edits = [p for p in window if p.kind == "edit"]
    out = {"edits": len(edits), "patches": len(window), "committed": False, "applied": False, "patch": None}
    if not edits:
        return {**out, "reason": "no fact edit applied since the last consolidation pass"}
    texts = consolidation_texts(m, cfg, B.stored(m), locality)
    if texts is None:
        raise MemeditError("no text to consolidate on: run `memedit background CORPUS` (it keeps a consolidation "
                           "sample of CORPUS) or pass --locality FILE")
    params = writable_tensors(m)
    for p in reversed(window):  # the folder before the window, in memory
        for c in labelled(m, p.changes):
            here = params[c.name][c.rows]
            if not torch.equal(here.view(torch.uint8), c.new.to(here.dtype).view(torch.uint8)):
                raise MemeditError(f"patch {p.id}'s rows are not in place in {m.source} (changed since it was "
                                   "applied): consolidate needs the patches since the last pass as they were applied")
        write_rows(m, p, new=False)
    try:
        sample = L.Locality(m, texts)
    finally:
        for p in window:
            write_rows(m, p, new=True)
    changed: dict[str, torch.Tensor] = {}
    for p in edits:
        for c in p.changes:
            changed[c.label] = torch.cat([changed.get(c.label, torch.empty(0, dtype=torch.long)), c.rows.long()])
    changed = {k: v.unique() for k, v in changed.items()}
    named = Mentions(sample.texts)
    named.add([(q.get("subject") or "", [a for a in (q.get("target_true"), q.get("target_new")) if isinstance(a, str)])
               for p in edits for q in p.info.get("requests") or [] if isinstance(q, dict)
               and isinstance(q.get("subject"), str)])
    kept = L.Answers(m, S.earlier_answers(m), S.HISTORY_KEPT)
    ccfg = replace(cfg, lr=cfg.lr if cfg.lr is not None else S.default_lr(m))
    rep = consolidate(m, sample, changed, named.named, kept, ccfg, seed=len(applied_ids(m)),
                      message=f"consolidate: {len(edits)} edits since the last pass, {len(kept)} edit answers kept")
    out.update(rep.to_json())
    out["sample"] = {"sequences": len(sample.texts), "positions": int(sample.valid.sum())}
    if rep.patch is not None and not dry_run:
        try:
            apply(m, rep.patch)
        except RowsChanged as e:  # another writer committed rows this pass trained while it ran
            raise MemeditError(f"{m.source} changed while the pass ran ({e.detail}): nothing was "
                               "written; run `memedit consolidate` again") from None
        out["applied"], out["patch"] = True, rep.patch.id
    elif rep.patch is None:
        out["reason"] = ("nothing the edits moved on the sample" if not rep.flipped_before + rep.answers_lost_before
                         else "the pass would take as much as it gives back, or lose an answer: not committed")
    return out


def run_cases(model, cases: Sequence[Case], *, sequential: bool = False, dry_run: bool = False, force: bool = False,
              config=None, locality: str | Path | None = None, facts: str | Path | None = None,
              keep_subject: bool = True, results: str | Path | None = None) -> dict:
    """Edit ``cases`` on ``model`` (a loaded model or a folder) and measure them; returns {"edits": [...],
    "summary": {...}} with memedit's, CounterFact's and EasyEdit's figures. ``dry_run``: nothing is written and the
    in-memory model is left as it was."""
    m = model if hasattr(model, "tables") else load(model)
    if not dry_run:
        require_writable(m)
    reqs = [c.request for c in cases]
    if not reqs:
        raise MemeditError("memedit.edit: no edit requests")
    cfg = S.EditConfig() if config is None else config
    cfg.check()
    if results is not None:
        FM.check_results_folder(results, cases)
    bg, world, loc = setup(m, reqs, cfg, locality, facts)
    FM.resolve_true(m, cases)
    pre = FM.snapshot(m, cases)
    out = S.run_edits(m, reqs, bg, cfg, sequential=sequential, commit=None if dry_run else (lambda p: apply(m, p)),
                      keep_facts=world if keep_subject and world else None,
                      subjects=[f.subject for f in world] if world else None, locality=loc, force=force,
                      consolidation=consolidation_sample(m, reqs, cfg, bg, sequential, locality))
    post = FM.snapshot(m, cases)
    if dry_run:  # measured in memory: put the rows back
        for res in reversed(out):
            if res.patch is not None and res.status in ("committed", "forced"):
                write_rows(m, res.patch, new=False)
    figures = [FM.case_figures(a, b) for a, b in zip(pre, post, strict=True)]
    rows = []
    k = 0
    for res in out:
        for n, per in enumerate(res.metrics["per_request"]):
            c = cases[k]
            rows.append({"case_id": c.case_id, "format": c.format, "status": res.status, "reason": res.reason,
                         "patch": res.patch.id if res.patch is not None else None,
                         "applied": res.status in ("committed", "forced") and not dry_run,
                         "steps": res.steps, "seconds": res.seconds,
                         "holds": res.holding[n] if res.holding else True, **per,
                         "counterfact": figures[k]["counterfact"]["post"], "easyedit": figures[k]["easyedit"]["post"],
                         "wild": figures[k]["wild"]["post"]})
            k += 1
    summary = {"edits": len(out), **{s: sum(r.status == s for r in out) for s in ("committed", "forced", "refused",
                                                                                    "already")},
               "formats": sorted({c.format for c in cases}),
               "subject_not_in_prompt": sum(not c.subject_in_prompt for c in cases), **FM.summarize(figures)}
    if results is not None:
        FM.write_results(results, cases, pre, post, [r["seconds"] for r in rows])
    return {"edits": rows, "summary": summary}


def edit(model, prompts, target_new, ground_truth=None, subject=None, rephrase_prompts=None, locality_inputs=None,
         sequential_edit: bool = False, **options) -> dict:
    """EasyEdit's ``editor.edit(prompts=..., target_new=..., ...)`` on a memedit model: see the module docstring.
    ``options``: ``dry_run``, ``force``, ``config`` (an EditConfig), ``locality`` (a text file), ``facts``,
    ``keep_subject``, ``results`` (a folder for ROME's case files) — as :func:`run_cases`."""
    return run_cases(model, cases_of(prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs),
                     sequential=sequential_edit, **options)
