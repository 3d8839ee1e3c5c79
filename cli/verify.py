"""memedit verify: prove the lookups exact against a brute-force search (or FAISS's product-key search)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from memedit import limits

from .common import DeviceOpt, JsonOpt, ModelOpt, StepProgress, app, command, console, esc, load_model, print_json


def parse_dtypes(spec: str, model_dtype):
    """The dtypes of the passes: "model" means the model's own; duplicates dropped, order kept."""
    from memedit.errors import MemeditError
    from memedit.storage.checkpoint import DTYPES

    out = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name == "model":
            dt = model_dtype
        elif name in DTYPES:
            dt = DTYPES[name]
        else:
            raise MemeditError(f"unknown dtype {name!r} in --dtypes (choose from model, {', '.join(DTYPES)})")
        if dt not in out:
            out.append(dt)
    if not out:
        raise MemeditError("--dtypes is empty")
    return out


@command(app)
def verify(
    corpus: Annotated[Optional[Path],
                      typer.Option(help="Text file, one passage per line (default: the model's demo world).")] = None,
    random: Annotated[int,
                      typer.Option("--random", min=0, max=limits.MAX_RANDOM_QUERIES,
                                   help="Check N random query vectors per memory layer instead of text (at most "
                                        f"{limits.MAX_RANDOM_QUERIES:,}).")] = 0,
    queries: Annotated[Optional[Path],
                       typer.Option(help="Saved query vectors: .npy (n, H, K) for one layer, or .npz with layer{L} "
                                         "arrays.")] = None,
    layer: Annotated[Optional[int],
                     typer.Option(help="Only this memory layer (needed for a .npy of queries when there are "
                                       "several).")] = None,
    dtypes: Annotated[str,
                      typer.Option(help="Compute dtypes to check, comma-separated ('model' = the model's "
                                        "own).")] = "model,float32,bfloat16",
    limit: Annotated[int, typer.Option(min=0, max=limits.MAX_VERIFY_LIMIT,
                                       help="Distinct text lookups per layer to check (0 = all; at most "
                                            f"{limits.MAX_VERIFY_LIMIT:,}).")] = 4096,
    threads: Annotated[int,
                       typer.Option(min=1, max=limits.MAX_THREADS,
                                    help="Threads for FAISS and torch (pinned: results differ between counts; at most "
                                         f"this machine's {limits.MAX_THREADS} cores).")] = 1,
    seed: Annotated[int, typer.Option(min=-limits.INT64_MAX - 1, max=limits.INT64_MAX,
                                      help="Seed of the random queries.")] = 0,
    save_queries: Annotated[Optional[Path],
                            typer.Option(help="Also write the checked queries (first dtype) as .npz.")] = None,
    examples: Annotated[int, typer.Option(min=0, help="Mismatches to print in full.")] = 3,
    reference: Annotated[str,
                         typer.Option(help="FAISS reference: flat (brute force over all slot keys, blockwise) or "
                                           "miq (its MultiIndexQuantizer product-key search).")] = "flat",
    model: ModelOpt = None,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Compare every memory head's top-k with an exact brute-force inner-product search over all N² slot keys.

    Exit code 0 when every lookup agrees (index differences only inside score ties), 1 on a confirmed lookup error.
    The reference is checked first: a faulty answer (a slot twice, an id out of range, a non-finite score) is
    reported as a reference fault and that query is judged by the brute force instead.

    Example: memedit verify --random 2000 --dtypes float32,bfloat16
    """
    from memedit.errors import MemeditError
    from memedit.keyspace import exact

    if sum(x is not None and x != 0 for x in (corpus, random, queries)) > 1:
        raise MemeditError("give only one of --corpus, --random and --queries")
    if reference not in exact.REFERENCES:
        raise MemeditError(f"unknown --reference {reference!r} (choose from {', '.join(exact.REFERENCES)})")
    m = load_model(model, device=device)
    if layer is not None and layer not in m.memory_layers:
        raise MemeditError(f"layer {layer} is not a memory layer (memory layers: {list(m.memory_layers)})")
    passes = parse_dtypes(dtypes, m.dtype)
    if random:
        source = exact.random_source(random, [layer] if layer is not None else None, seed)
        name = f"{random} random queries"
    elif queries is not None:
        source, name = exact.saved_source(exact.load_queries(str(queries), m, layer)), str(queries)
    else:
        if m.tokenizer is None:
            raise MemeditError("this model has no tokenizer (a standalone memory module): give query vectors "
                               "with --random N or --queries FILE")
        texts = read_corpus(corpus, m)
        source, name = exact.corpus_source(texts, limit), str(corpus or "the demo world corpus")
        if layer is not None:
            inner = source
            source = lambda mm, dt: {layer: inner(mm, dt)[layer]}  # noqa: E731
    if save_queries is not None:
        source = exact.saving_queries(source, str(save_queries))
    with StepProgress("verifying", "heads", disable=json) as bar:
        report = exact.verify(m, source, name, passes, threads=threads, progress=bar, reference=reference)
    if json:
        print_json(report.to_json())
    else:
        render(report, examples)
    if not report.ok:
        raise typer.Exit(1)


def read_corpus(path: Optional[Path], model) -> list[str]:
    from memedit.errors import MemeditError
    from memedit.world.facts import world_of

    if path is None:
        if not model.meta.get("world"):
            raise MemeditError("nothing to verify on: this model has no demo world to default to; pass --corpus FILE, "
                               "--random N or --queries FILE")
        return world_of(model).training_sentences()
    from memedit.storage.corpus import read_texts

    return read_texts(path, "corpus")


def render(report, examples: int) -> None:
    console.print(f"[bold]queries[/] {esc(report.source)}")
    for p in report.passes:
        t = Table(title=f"{p.dtype} (tolerance {p.rtol:.1e} × score scale)")
        for c in ("L", "head", "lookups", "agree", "same ids", "tie only", "lookup errors", "ref faults",
                  "k-th ties", "max |Δ|"):
            t.add_column(c, justify="right")
        for h in p.heads:
            t.add_row(str(h.layer), str(h.head), f"{h.lookups:,}", f"{h.agreement:.1%}", f"{h.identical:,}",
                      f"{h.tie_agree:,}", f"[{'red' if h.mismatches else 'green'}]{h.mismatches:,}[/]",
                      f"{h.reference_faults + h.reference_errors:,}", f"{h.ties:,}", f"{h.max_score_diff:.1e}")
        console.print(t)
        n = max(p.lookups, 1)
        ident, tie, ties = p.total("identical"), p.total("tie_agree"), p.total("ties")
        console.print(f"{p.dtype}: {p.lookups:,} lookups; index sets identical {ident / n:.2%}, differing only inside "
                      f"ties {tie / n:.2%}, lookup errors {p.mismatches:,}; a tie at the k-th score in "
                      f"{ties / n:.2%}")
        faults, wrong = p.total("reference_faults"), p.total("reference_errors")
        if faults or wrong:
            console.print(f"{p.dtype}: the reference was faulty for {faults:,} queries and wrong for {wrong:,}; "
                          f"{p.total('rechecked'):,} re-checked against the brute force, "
                          f"{p.total('unproven'):,} unproven")
    for p in report.passes:
        for h in p.heads:
            for f in h.faults:
                console.print(f"[yellow]{f.kind}[/] {p.dtype} layer {f.layer} head {f.head} query {f.query}: "
                              f"{esc(f.reason)} (the lookup was judged by the brute force instead)")
    shown = 0
    for p in report.passes:
        for h in p.heads:
            for ex in h.examples:
                if shown >= examples:
                    break
                shown += 1
                console.print(f"[red]lookup error[/] {p.dtype} layer {ex.layer} head {ex.head} query {ex.query}: "
                              f"{ex.reason}")
                console.print(f"  memedit slots {ex.memedit_slots}\n  memedit scores "
                              f"{[round(x, 5) for x in ex.memedit_scores]}")
                console.print(f"  true scores    {[round(x, 5) for x in ex.true_scores]}")
                console.print(f"  reference slots {ex.faiss_slots}\n  reference scores "
                              f"{[round(x, 5) for x in ex.faiss_scores]}")
    unproven = sum(p.total("unproven") for p in report.passes)
    if report.ok:
        verdict = "[green]all lookups agree with the exact reference search[/]"
    elif any(p.mismatches for p in report.passes):
        verdict = "[red]LOOKUP ERRORS: the lookup is not exact[/]"
    else:
        verdict = f"[red]{unproven:,} lookups could not be judged: the brute-force reference itself was faulty[/]"
    console.print(verdict)
