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
from pathlib import Path

from ..errors import MemeditError
from ..storage.checkpoint import load, require_writable
from ..world.facts import load_facts, world_of
from . import background as B
from . import field_metrics as FM
from . import locality as L
from . import sparse_ft as S
from .formats import Case, _easyedit
from .patch import apply, write_rows


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
    if locality is not None:
        texts = L.draw_sample(m, L.read_locality(locality), cfg.consolidate_tokens, seed=1)
    elif bg is not None and bg.consolidation:
        texts = bg.consolidation
    elif m.meta.get("world"):
        texts = L.draw_sample(m, world_of(m).training_sentences(), cfg.consolidate_tokens, seed=1)
    else:
        return None
    return L.Locality(m, texts)


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
