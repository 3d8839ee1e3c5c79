"""Editing commands: `patch ...` (patch_cmd.py), `freeze`/`unfreeze`/`frozen`, `background`, `edit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from memedit import limits
from memedit.editing.config import BACKGROUND_BATCH, BACKGROUND_MAX_BATCHES, FORGETTING_SAMPLE, EditConfig

from . import patch_cmd  # noqa: F401  (registers the `patch` group)
from .common import DeviceOpt, JsonOpt, ModelOpt, StepProgress, app, command, console, esc, load_model, print_json
from .validate import finite

EDIT = EditConfig()  # the library's defaults, read by the options below

FactsOpt = Annotated[Optional[Path], typer.Option("--facts", help="Facts JSONL (default: the model's own world).")]


def _table_name(m, table: Optional[str]) -> str:
    from memedit.errors import MemeditError

    if table is not None:
        return m.table(table).name
    if len(m.tables) != 1:
        raise MemeditError(f"this model has several value tables ({', '.join(t.name for t in m.tables)}): pass --table")
    return m.tables[0].name


def _fact(m, fact_id: str, facts: Optional[Path]):
    from memedit.errors import MemeditError
    from memedit.world.facts import load_facts, world_of

    if facts is None:
        return world_of(m).fact(fact_id)
    for f in load_facts(facts):
        if f.id == fact_id:
            return f
    raise MemeditError(f"no fact {fact_id!r} in {facts}")


@command(app)
def freeze(
    table: Annotated[Optional[str], typer.Option("--table", "-t", help="Value table (default: the only one).")] = None,
    rows: Annotated[Optional[list[str]], typer.Option("--rows", "-r", help="Row ids: 3,7,10-12.")] = None,
    fact: Annotated[Optional[str], typer.Option("--fact", help="Freeze a fact's core set (e.g. f00012).")] = None,
    facts: FactsOpt = None,
    hot: Annotated[Optional[int],
                   typer.Option("--hot", help="Freeze the N most-read rows of each table (background).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="Row ids from a text or .npy file.")] = None,
    stats: Annotated[Optional[Path],
                     typer.Option("--stats", help="With --hot: rank rows by this audit file's access counts (`memedit "
                                                  "audit --out`) instead of background statistics.")] = None,
    model: ModelOpt = None,
    json: JsonOpt = False,
) -> None:
    """Freeze value rows: no patch, fact edit or key update may change them afterwards.

    Example: memedit freeze -m ./my-model --fact f00012
    Example: memedit freeze -m ./my-model --hot 100 --stats audit.h5
    """
    from memedit.editing import freeze as F
    from memedit.editing.patch import parse_rows
    from memedit.errors import MemeditError

    m = load_model(model)
    from memedit.storage.checkpoint import require_writable

    require_writable(m)
    picked: dict[str, list[int]] = {}

    def add(d: dict[str, list[int]]) -> None:
        for k, v in d.items():
            picked.setdefault(k, []).extend(v)

    if rows:
        add({_table_name(m, table): parse_rows(rows)})
    if file is not None:
        add({_table_name(m, table): F.rows_from_file(file)})
    if fact is not None:
        add(F.fact_rows(m, _fact(m, fact, facts).training_prompts))
    if stats is not None and hot is None:
        raise MemeditError("--stats ranks rows for --hot: pass --hot N too")
    if hot is not None:
        add(F.hot_rows(m, hot, stats))
    if not picked:
        raise MemeditError("nothing to freeze: pass --rows, --fact, --hot or --file")
    if not any(picked.values()):
        raise MemeditError("no rows selected (a fact's core set can be empty when its phrasings share no slot)")
    added = F.freeze(m, picked)
    res = {"added": added, "frozen": {k: len(v) for k, v in F.frozen(m).items()}}
    if json:
        return print_json(res)
    for k, n in added.items():
        console.print(f"froze {n} new rows of table {k} ({res['frozen'].get(k, 0)} frozen in all)")


@command(app)
def unfreeze(
    table: Annotated[Optional[str], typer.Option("--table", "-t", help="Value table (default: the only one).")] = None,
    rows: Annotated[Optional[list[str]], typer.Option("--rows", "-r", help="Row ids: 3,7,10-12.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Unfreeze every value row.")] = False,
    model: ModelOpt = None,
    json: JsonOpt = False,
) -> None:
    """Unfreeze value rows.

    Example: memedit unfreeze -m ./my-model --rows 5,9
    """
    from memedit.editing import freeze as F
    from memedit.editing.patch import parse_rows
    from memedit.errors import MemeditError

    m = load_model(model)
    if not all_ and not rows:
        raise MemeditError("pass --rows or --all")
    freed = F.unfreeze(m, None if all_ else {_table_name(m, table): parse_rows(rows)})
    if json:
        return print_json({"freed": freed})
    for k, n in freed.items():
        console.print(f"unfroze {n} rows of table {k}")


@command(app)
def frozen(model: ModelOpt = None, json: JsonOpt = False) -> None:
    """List the frozen value rows.

    Example: memedit frozen -m ./my-model --json
    """
    from memedit.editing.freeze import frozen as get

    d = get(load_model(model))
    if json:
        return print_json(d)
    if not d:
        console.print("no frozen rows")
        return
    t = Table()
    for c in ("table", "frozen rows", "ids"):
        t.add_column(c)
    for k, v in d.items():
        t.add_row(k, str(len(v)), ", ".join(map(str, v[:12])) + (" ..." if len(v) > 12 else ""))
    console.print(t)


@command(app)
def background(
    corpus: Annotated[Optional[Path], typer.Argument(help="Text file, one sentence per line (default: the demo "
                                                          "world's filler and facts).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=limits.MAX_BATCH_SIZE,
                                            help="Sentences per background batch (at most "
                                                 f"{limits.MAX_BATCH_SIZE:,}).")] = BACKGROUND_BATCH,
    max_batches: Annotated[int, typer.Option("--max-batches", min=1, max=limits.MAX_BATCHES,
                                             help="Use at most this many batches.")] = BACKGROUND_MAX_BATCHES,
    consolidation_tokens: Annotated[int, typer.Option(
        "--consolidation-tokens", min=0, max=10_000_000,
        help="Keep this many tokens of whole sentences of the corpus as the sample consolidation passes restore "
             "(`memedit consolidate`, `edit --sequential`; 0: none; a pass is a forward over it).")
    ] = EDIT.consolidate_tokens,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Compute and store background slot statistics (per-batch document frequency and counts) for fact edits.

    Example: memedit background -m ./my-model
    """
    import time

    from memedit.editing import background as B
    from memedit.storage.checkpoint import require_writable
    from memedit.storage.corpus import read_texts

    m = load_model(model, device=device)
    require_writable(m)
    sentences = read_texts(corpus, "corpus") if corpus is not None else B.default_corpus(m)
    t0 = time.perf_counter()
    with StepProgress("background", "batches", disable=json) as bar:
        bg = B.compute(m, sentences, batch_size, max_batches, corpus=str(corpus) if corpus else "default: demo world",
                       progress=bar, consolidation_tokens=consolidation_tokens)
    B.save(m, bg)
    res = {"n_batches": bg.n_batches, "tokens": bg.tokens, "seconds": round(time.perf_counter() - t0, 2),
           "tables": {k: {"rows_read": int((v > 0).sum()), "rows": v.numel()} for k, v in bg.df.items()},
           "locality_texts": len(bg.locality or []), "consolidation_texts": len(bg.consolidation or [])}
    if json:
        return print_json(res)
    console.print(f"background over {bg.n_batches} batches ({bg.tokens:,} tokens) in {res['seconds']}s; "
                  f"{res['locality_texts']} texts kept as the locality sample edits are measured on")
    for k, v in res["tables"].items():
        console.print(f"table {k}: {v['rows_read']:,} of {v['rows']:,} rows read at least once")


@command(app)
def edit(
    prompt: Annotated[Optional[str], typer.Option("--prompt", help='Rewrite prompt, "{}" for the subject.')] = None,
    subject: Annotated[str, typer.Option("--subject", help="The subject filled into {}.")] = "",
    target_new: Annotated[Optional[str], typer.Option("--target-new", help="The new answer.")] = None,
    target_true: Annotated[str, typer.Option("--target-true", help="The old answer (default: the model's).")] = "",
    paraphrase: Annotated[Optional[list[str]],
                          typer.Option("--paraphrase", help="Training phrasing (repeatable).")] = None,
    heldout: Annotated[Optional[list[str]], typer.Option("--heldout", help="Held-out phrasing, measured only.")] = None,
    neighborhood: Annotated[Optional[list[str]],
                            typer.Option("--neighborhood", help="Prompt that must keep its answer.")] = None,
    fact: Annotated[Optional[list[str]],
                    typer.Option("--fact", help="Rewrite a world fact to its target_new (id).")] = None,
    requests: Annotated[Optional[Path], typer.Option("--requests", help="Edit requests: memedit JSONL, or CounterFact, "
                                                    "ZsRE or EasyEdit records (a JSON array or JSONL).")] = None,
    results_dir: Annotated[Optional[Path], typer.Option("--results", help="Write one case_ID.json per request here, in "
                                                    "ROME's result layout (pre and post metrics).")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="One edit per request, in order.")] = False,
    top_t: Annotated[Optional[int], typer.Option("--top-t", min=1, help="At most this many value rows trained per "
                                                                         "fact.")] = None,
    adaptive: Annotated[bool, typer.Option("--adaptive/--fixed",
                                           help=f"Train as few rows as the edit needs ({EDIT.min_t}, doubled while it "
                                                "does not hold, up to --top-t), or always --top-t.")] = EDIT.adaptive,
    protect: Annotated[str, typer.Option("--protect", help="Rows left alone: none; edits (rows earlier edits "
                                                           "trained); hot (also the background's most-read).")]
    = EDIT.protect,
    contrast: Annotated[Optional[int], typer.Option("--contrast", min=0, help="Leave alone the rows the prompt reads "
                                                    "at the new target about this many other subjects (of the known "
                                                    f"facts, else the request's neighborhood prompts; default "
                                                    f"{EDIT.contrast}). 0: off.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", callback=finite(0.0, limits.MAX_LR, lo_open=True),
                                                help=f"Learning rate (above 0, at most {limits.MAX_LR:g}).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="At most this many steps.")] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd, or adamw (forgets more).")] = EDIT.optimizer,
    ranking: Annotated[str, typer.Option("--ranking", help="tfidf, kl, or counts.")] = EDIT.ranking,
    positions: Annotated[Optional[str],
                         typer.Option("--positions",
                                      help="Rank the rows read at every prompt position (all, the default: the "
                                           "subject's rows carry a fact to every wording) or at the answer "
                                           "positions only (answer).")] = None,
    keep_subject: Annotated[bool,
                            typer.Option("--keep-subject/--no-keep-subject",
                                         help="Keep the answers of the subject's other facts (from --facts or the "
                                              "model's own world, when known) in the loss, so the rows at the "
                                              "subject's tokens change only what those facts do not need.")] = True,
    forgetting_sample: Annotated[int, typer.Option("--forgetting-sample", min=0,
                                                   help="Other facts' prompts to measure forgetting on "
                                                        "(0: skip).")] = FORGETTING_SAMPLE,
    facts: FactsOpt = None,
    locality: Annotated[Optional[Path],
                        typer.Option("--locality", help="Text (one passage a line, or JSONL \"text\") whose "
                                                        "next-token predictions the edit must not change (default: "
                                                        "the sample stored by `memedit background`).")] = None,
    max_collateral: Annotated[Optional[float],
                              typer.Option("--max-collateral", min=0.0, max=1.0,
                                           help="Refuse an edit that changes the greedy next token at more than "
                                                f"this share of the locality sample's positions (default {EDIT.max_collateral}; a "
                                                "batch of n requests: n times it).")]
    = None,
    consolidate_every: Annotated[int, typer.Option("--consolidate-every", min=0,
                                                   help="With --sequential: after every this many committed edits "
                                                        "(and after the last, in a run of at least this many), give "
                                                        "back what the edits moved on a larger sample of the "
                                                        "background corpus, keeping every edit's answer (one "
                                                        "revertible patch; 0: never).")] = EDIT.consolidate_every,
    force: Annotated[bool, typer.Option("--force", help="Commit edits the guard refuses (too much collateral, or "
                                                        "not holding), and say so.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Measure, but leave the model folder unchanged.")] = False,
    out: Annotated[Optional[Path],
                   typer.Option("--out", "-o", help="Also write the patch file here (one patch).")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Rewrite facts by sparse memory finetuning: train only the value rows that matter, save it as a patch.

    Every edit is measured on a locality sample of text before it is committed: an edit that changes the greedy
    next token at more than --max-collateral of the sample's positions, or that does not hold, is refused (exit 1,
    the folder unchanged; --force commits it anyway). --requests without --sequential is one batch.

    Example: memedit edit -m ./my-model --prompt "{} was born in" --subject Reidreir --target-new Zaishail
    """
    import warnings

    from memedit.editing import sparse_ft as S
    from memedit.editing.api import consolidation_sample, setup
    from memedit.editing.patch import apply
    from memedit.errors import MemeditError
    from memedit.storage.checkpoint import require_writable

    m = load_model(model, device=device)
    if not dry_run:
        require_writable(m)
    reqs, cases = _requests(m, prompt, subject, target_new, target_true, paraphrase, heldout, neighborhood, fact,
                            requests, facts)
    if out is not None and sequential and len(reqs) > 1:
        raise MemeditError("--out writes one patch; with --sequential every edit is logged in the model folder")
    if out is not None:
        from memedit.storage.checkpoint import check_output

        check_output(m, out)  # before anything is applied
    cfg = S.EditConfig(optimizer=optimizer, ranking=ranking, adaptive=adaptive, protect=protect,
                       consolidate_every=consolidate_every)
    for k, v in (("top_t", top_t), ("lr", lr), ("steps", steps), ("positions", positions), ("contrast", contrast),
                 ("max_collateral", max_collateral)):
        if v is not None:
            setattr(cfg, k, v)
    cfg.check()  # before the background statistics and the forgetting sample are read
    bg, world, loc = setup(m, reqs, cfg, locality, facts)
    field = _field_pre(m, cases, results_dir)  # the field's metrics (CounterFact, EasyEdit) before the run
    forgetting = S.Forgetting(m, world, forgetting_sample) if forgetting_sample and world else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = S.run_edits(m, reqs, bg, cfg, sequential=sequential,
                              commit=None if dry_run else (lambda p: apply(m, p)), forgetting=forgetting,
                              keep_facts=world if keep_subject and world else None,
                              subjects=[f.subject for f in world] if world else None, locality=loc, force=force,
                              consolidation=consolidation_sample(m, reqs, cfg, bg, sequential, locality))
    for w in caught:
        from .common import err_console

        err_console.print(f"[yellow]warning:[/] {esc(str(w.message))}")
    committed = [r for r in results if r.status in ("committed", "forced")]
    if out is not None and committed:
        committed[0].patch.save(out)
    rows = []
    for res in results:
        info = res.patch.info["requests"] if res.patch is not None else None
        for n, per in enumerate(res.metrics["per_request"]):
            req = info[n] if info is not None else None
            rows.append({"status": res.status, "reason": res.reason,
                         "patch": res.patch.id if res.patch is not None else None,
                         "applied": res.status in ("committed", "forced") and not dry_run,
                         "rows_trained": res.patch.n_rows if res.patch is not None else 0,
                         "tables": {c.table: c.layers for c in res.patch.changes} if res.patch is not None else {},
                         "steps": res.steps, "loss": res.loss, "seconds": res.seconds,
                         "holds": res.holding[n] if res.holding else True, **per,
                         "collateral": res.collateral.to_json() if res.collateral is not None else None,
                         "forgetting": res.metrics.get("forgetting"),
                         "request": req if req is not None else _request_json(reqs, results, res, n)})
    counts = {k: sum(r.status == k for r in results) for k in ("committed", "forced", "refused", "already")}
    summary = {"edits": len(results), **counts, "locality": {"sequences": len(loc.texts),
                                                             "positions": int(loc.valid.sum())},
               "max_collateral": cfg.max_collateral,
               "consolidations": [dict(after_edit=i + 1, patch=r.consolidation.patch.id if r.consolidation.committed
                                       else None, **r.consolidation.to_json())
                                  for i, r in enumerate(results) if r.consolidation is not None]}
    if field is not None:
        _field_post(m, field, rows, summary, results_dir)
    if json:
        print_json({"edits": rows, "summary": summary})
    else:
        _print_edits(m, rows, summary, dry_run)
        if field is not None:
            _print_field(summary)
    if counts["refused"]:
        raise typer.Exit(1)


def _request_json(reqs, results, res, n):
    """The request of row ``n`` of a result without a patch (its group's n-th request)."""
    from dataclasses import asdict

    start = sum(len(r.metrics["per_request"]) for r in results[: results.index(res)])
    return asdict(reqs[start + n])


def _print_edits(m, rows, summary, dry_run) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    for n, r in enumerate(rows, 1):
        q = r["request"]
        text = q["prompt"].replace("{}", q["subject"])
        what = {"committed": "", "forced": " [yellow]FORCED over the guard[/]",
                "refused": " [red]REFUSED, not committed[/]", "already": " already answered: skipped"}[r["status"]]
        patch = f"patch {r['patch']}: {r['rows_trained']} rows, {r['steps']} steps, " if r["patch"] else ""
        co = r["collateral"]
        co = "" if co is None else f", collateral {co['changed']:.2%} (KL {co['kl_mean']:.1e})"
        console.print(f"[bold]{n}.[/] {esc(text)} [red]{esc(q['target_true'])}[/] -> [green]{esc(q['target_new'])}[/]  "
                      f"{patch}{r['seconds']:.2f}s{co}{what}")
        if r["reason"]:
            console.print(f"   {esc(r['reason'])}")
    t = Table(title="fact edits" + (" (dry run: nothing written)" if dry_run else ""))
    for c in ("#", "efficacy", "paraphrase", "held-out", "neighborhood", "score", "forgetting"):
        t.add_column(c, justify="right")
    for n, r in enumerate(rows, 1):
        fg = r["forgetting"]
        t.add_row(str(n), fmt(r["efficacy"]), fmt(r["paraphrase"]), fmt(r["paraphrase_heldout"]),
                  fmt(r["neighborhood"]), f"{r['score']:.2f}", "-" if fg is None else f"{fg['change'] * 100:+.1f} pts")
    console.print(t)
    s = summary
    console.print(f"{s['committed']} committed, {s['forced']} forced, {s['refused']} refused, {s['already']} already "
                  f"answered (collateral: share of {s['locality']['positions']:,} locality positions whose greedy "
                  f"next token changed; budget {s['max_collateral']:.2%})")
    for c in s["consolidations"]:
        got = (f"committed as patch {c['patch']}: {c['rows']} rows, {c['steps']} steps" if c["committed"]
               else "nothing to commit")
        console.print(f"consolidation after edit {c['after_edit']}: {c['flipped_before']} -> {c['flipped_after']} of "
                      f"{c['checked']:,} sample sequences changed, {c['answers_lost_before']} -> "
                      f"{c['answers_lost_after']} edit answers lost; {got}")
    shared = {tb: ls for r in rows for tb, ls in r["tables"].items() if len(ls) > 1}
    for tb, ls in shared.items():
        console.print(f"table {tb} is read by layers {', '.join(map(str, ls))}: all of them change")
    if not dry_run and (s["committed"] or s["forced"]):
        console.print(f"applied to {m.source}; undo with `memedit patch revert ID -m {m.source}`")


def _requests(m, prompt, subject, target_new, target_true, paraphrase, heldout, neighborhood, fact, requests, facts):
    """The edit requests from the options: one from --prompt, world facts from --fact, or a JSONL file."""
    from memedit.editing.formats import read_cases
    from memedit.editing.sparse_ft import EditRequest
    from memedit.errors import MemeditError

    given = [prompt is not None, bool(fact), requests is not None]
    if sum(given) != 1:
        raise MemeditError("give exactly one of --prompt (with --subject, --target-new), --fact ID, --requests FILE")
    if prompt is not None:
        if not target_new:
            raise MemeditError("--prompt needs --target-new")
        return [EditRequest(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true,
                            paraphrases=list(paraphrase or []), heldout_paraphrases=list(heldout or []),
                            neighborhood=list(neighborhood or []))], None
    if fact:
        return [EditRequest.from_fact(_fact(m, f, facts)) for f in fact], None
    cases = read_cases(requests)
    return [c.request for c in cases], cases


def _field_pre(m, cases, results):
    """(cases, pre-edit snapshots) of a --requests run (None otherwise); --results checked before any edit."""
    from memedit.editing import field_metrics as FM
    from memedit.errors import MemeditError

    if cases is None:
        if results is not None:
            raise MemeditError("--results writes one file per case of --requests FILE: pass --requests")
        return None
    if results is not None:
        FM.check_results_folder(results, cases)
    FM.resolve_true(m, cases)
    return cases, FM.snapshot(m, cases)


def _field_post(m, field, rows, summary, results) -> None:
    """CounterFact's and EasyEdit's figures of the run into the rows and the summary; --results files."""
    from memedit.editing import field_metrics as FM

    cases, pre = field
    post = FM.snapshot(m, cases)
    figures = [FM.case_figures(a, b) for a, b in zip(pre, post, strict=True)]
    for row, c, f in zip(rows, cases, figures, strict=True):
        row["format"], row["case_id"] = c.format, c.case_id
        row["counterfact"], row["easyedit"], row["wild"] = (f["counterfact"]["post"], f["easyedit"]["post"],
                                                            f["wild"]["post"])
    summary["formats"] = sorted({c.format for c in cases})
    summary["subject_not_in_prompt"] = sum(not c.subject_in_prompt for c in cases)
    summary.update(FM.summarize(figures))
    if results is not None:
        FM.write_results(results, cases, pre, post, [r["seconds"] for r in rows])
        summary["results"] = {"folder": str(results), "files": len(cases)}


def _print_field(s) -> None:
    pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    cf, ee, wd = s["counterfact"], s["easyedit"], s["wild"]
    t = Table(title=f"the field's metrics ({', '.join(s['formats'])} records; means over cases)")
    for c in ("", "eff", "para", "neigh", "score", "rel", "gen", "loc", "W-rel", "W-gen"):
        t.add_column(c, justify="right")
    for when in ("pre", "post"):
        d, e = cf[when], ee[when]
        t.add_row(when, pct(d["rewrite_success"]), pct(d["paraphrase_success"]), pct(d["neighborhood_success"]),
                  pct(d["score"]), pct(e["rel"]), pct(e["gen"]), pct(e.get("loc")), pct(wd[when]["rel"]),
                  pct(wd[when]["gen"]))
    d = cf["post"]
    t.add_row("magn.", pct(d["rewrite_diff"]), pct(d["paraphrase_diff"]), pct(d["neighborhood_diff"]), "", "", "",
              "", "", "")
    console.print(t)
    console.print("eff / para / neigh: CounterFact's efficacy, paraphrase, neighborhood successes (ROME: mean NLL "
                  "of the new target below the old one's; neighbourhood reversed), magn.: mean P(new) - P(old); "
                  "rel / gen: EasyEdit's "
                  "token accuracy; loc: post-edit argmax equal to pre-edit; W-rel / W-gen: WILD, free greedy "
                  "generation equal to the new target")
    if s["subject_not_in_prompt"]:
        console.print(f"{s['subject_not_in_prompt']} request(s) name a subject their prompt does not hold: edited on "
                      "the prompt as it is, without contrast with other subjects")
    if "results" in s:
        console.print(f"wrote {s['results']['files']} case files (ROME's layout) to {esc(s['results']['folder'])}")


@command(app)
def consolidate(
    steps: Annotated[int, typer.Option("--steps", min=1, max=10_000,
                                       help="At most this many training steps.")] = EDIT.consolidate_steps,
    tokens: Annotated[int, typer.Option("--tokens", min=100, max=10_000_000,
                                        help="Tokens of --locality FILE to consolidate on (the stored sample "
                                             "is used as it is).")] = EDIT.consolidate_tokens,
    locality: Annotated[Optional[Path],
                        typer.Option("--locality", help="Text (one passage a line, or JSONL \"text\") to give back "
                                                        "(default: the consolidation sample stored by `memedit "
                                                        "background`).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Measure and train, write nothing.")] = False,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Give back what the fact edits since the last consolidation moved on a larger text sample, keeping every
    edit's answer: one revertible patch, committed only when it gives back more than it takes and loses no answer.

    For edits made one `memedit edit` call at a time (a `--sequential` run consolidates by itself every
    --consolidate-every edits). The reference is the folder before those edits; only the rows they trained change.

    Example: memedit consolidate -m ./my-model
    """
    from memedit.editing.api import consolidate_folder

    m = load_model(model, device=device)
    cfg = EditConfig(consolidate_steps=steps, consolidate_tokens=tokens).check()
    res = consolidate_folder(m, cfg, locality=locality, dry_run=dry_run)
    if json:
        return print_json(res)
    if not res["edits"]:
        console.print(f"nothing to consolidate: {res['reason']}")
        return
    head = (f"{res['edits']} edits since the last pass: {res['flipped_before']} -> {res['flipped_after']} of "
            f"{res['checked']:,} sample sequences changed, {res['answers_lost_before']} -> "
            f"{res['answers_lost_after']} edit answers lost; ")
    if res["patch"] is not None:
        console.print(head + f"committed as patch {res['patch']} ({res['rows']:,} rows, {res['steps']} steps); undo "
                             f"with `memedit patch revert {res['patch']} -m {esc(str(m.source))}`")
    elif res["committed"]:
        console.print(head + f"would commit {res['rows']:,} rows ({res['steps']} steps); --dry-run: nothing written")
    else:
        console.print(head + res["reason"])
