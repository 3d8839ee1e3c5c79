"""`memedit inspect` (trace a prompt or a fact) and `memedit trace-causal` (memory causal tracing)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from memedit import limits

from .common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, app, command, console, esc, load_model, print_json
from .validate import finite


@contextlib.contextmanager
def _loaded(model: Optional[str], dtype: Optional[str], device: Optional[str] = None) -> Iterator:
    yield load_model(model, dtype, device=device)


def _tokens(items: list[dict]) -> str:
    return esc(" ".join(repr(x["token"]) for x in items))  # quoted: a decoded token's own space shows


TargetOpt = Annotated[
    Optional[str], typer.Option("--target", "-t", help="Answer to score (every token of it); default: the model's "
                                                       "own answer, greedy to the end of the word.")
]
FactOpt = Annotated[Optional[str], typer.Option("--fact", help="Trace a fact and its paraphrases by id (e.g. f00000).")]
FactsOpt = Annotated[
    Optional[Path], typer.Option("--facts", help="Facts JSONL for --fact (default: the model's own world).")
]
AllPositionsOpt = Annotated[
    bool, typer.Option("--all-positions", help="Also trace every earlier position (scoring the prompt's next token).")
]


@command(app)
def inspect(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt whose next token is traced.")] = None,
    target: TargetOpt = None,
    fact: FactOpt = None,
    facts: FactsOpt = None,
    all_positions: AllPositionsOpt = False,
    top: Annotated[int, typer.Option("--top", min=1, help="How many top-attributed slots to list.")] = 10,
    per_head: Annotated[int, typer.Option("--per-head", min=0, help="Slots shown per head (0: all k).")] = 4,
    heldout: Annotated[bool, typer.Option("--heldout", help="With --fact: held-out phrasings join the core set.")]
    = False,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json: JsonOpt = False,
) -> None:
    """Trace which slots fire for PROMPT and how much each one moves the answer.

    The target is a token sequence: its log-probability is the sum over its tokens (teacher forcing). Shows the
    top-5 next tokens, the whole target's log-probability and its first token's rank; per memory layer and head,
    the k slots at the position that predicts the first target token. Per slot: sub-keys (i, j), score, weight,
    attribution (direct logit attribution to the token predicted there) and ablation (the change in the WHOLE
    target's log-probability when the slot is dropped). Then the top slots with the tokens their value rows promote
    and suppress, one line per target token, and the slots whose removal hurts the whole target most.

    Example: memedit inspect "Reidreir was born in" --target Shoushour
    Example: memedit inspect --fact f00000 --json
    """
    if fact is None and facts is not None:
        from memedit.errors import MemeditError

        raise MemeditError("--facts needs --fact ID: which fact of the file to trace")
    if fact is not None:
        return _inspect_fact(fact, facts, heldout, model, dtype, json, device)
    if prompt is None:
        from memedit.errors import MemeditError

        raise MemeditError('give a PROMPT (memedit inspect "Reidreir was born in") or --fact ID')
    from memedit.tracing.trace import trace

    with _loaded(model, dtype, device) as m:
        d = trace(m, prompt, target).to_dict(all_positions=all_positions, top_slots=top)
    if json:
        return print_json(d)
    _render_trace(d, per_head)


def _render_trace(d: dict, per_head: int) -> None:
    tg = d["target"]
    console.print(f"[bold]prompt[/] {esc(repr(d['prompt']))}  ({len(d['tokens'])} tokens, first target token "
                  f"predicted at position {d['position']})")
    spelled = " ".join(esc(repr(t)) for t in tg["tokens"])
    console.print(f"[bold]target[/] {esc(repr(tg['text']))} = {tg['n_tokens']} token(s) {spelled}: "
                  f"log p = {tg['logprob']:.3f} (mean {tg['mean_logprob']:.3f} per token), p = {tg['prob']:.4f}, "
                  f"first token rank {tg['first_rank']}, greedy continuation {'is' if tg['exact_match'] else 'is not'}"
                  " the target")
    if tg["note"]:
        console.print(f"[yellow]{esc(tg['note'])}[/]")
    if d.get("warning"):
        console.print(f"[yellow]warning: {esc(d['warning'])}[/]")
    console.print("[bold]next token[/] " + ", ".join(f"{esc(repr(x['token']))} {x['prob']:.3f}" for x in d["top"]))
    for layer in d["layers"]:
        slot_sum = sum(s["attribution"] for h in layer["heads"] for s in h["slots"])
        t = Table(title=f"memory layer {layer['layer']} (table {layer['table']}): "
                        f"attribution {layer['attribution']:+.3f} "
                        f"= slots {slot_sum:+.3f} + bias {layer['bias_attribution']:+.3f}", title_justify="left")
        for c in ("head", "slot", "(i, j)", "score", "weight", "attribution", "ablation Δlogp"):
            t.add_column(c, justify="right")
        for h in layer["heads"]:
            shown = h["slots"] if per_head == 0 else h["slots"][:per_head]
            for n, s in enumerate(shown):
                t.add_row(str(h["head"]) if n == 0 else "", str(s["slot"]), f"({s['i']}, {s['j']})",
                          f"{s['score']:.3f}",
                          f"{s['weight']:.3f}", _signed(s["attribution"]), _signed(s["ablation"]))
            if len(shown) < len(h["slots"]):
                t.add_row("", f"[dim]+{len(h['slots']) - len(shown)} more[/]", "", "", "", "", "")
        console.print(t)
    t = Table(title=f"top {len(d['top_slots'])} slots by attribution to {esc(repr(tg['token']))}", title_justify="left")
    for c in ("layer", "head", "slot", "attribution", "ablation Δlogp", "read by", "promotes", "suppresses"):
        t.add_column(c, justify="right" if c in ("layer", "head", "slot", "attribution", "ablation Δlogp") else "left")
    for s in d["top_slots"]:
        t.add_row(str(s["layer"]), str(s["head"]), str(s["slot"]), _signed(s["attribution"]), _signed(s["ablation"]),
                  ",".join(map(str, s["read_by"])), _tokens(s["promotes"][:3]), _tokens(s["suppresses"][:3]))
    console.print(t)
    if len(d["per_token"]) > 1:
        t = Table(title="per target token (the position that predicts it)", title_justify="left")
        for c in ("pos", "predicts", "p", "rank", "top slot (layer/head/slot)", "attribution", "ablation Δlogp"):
            t.add_column(c)
        for p in d["per_token"]:
            best = p["top_slots"][0] if p["top_slots"] else None
            t.add_row(str(p["position"]), esc(repr(p["scored"]["token"])), f"{p['scored']['prob']:.3f}",
                      str(p["scored"]["rank"]), f"{best['layer']}/{best['head']}/{best['slot']}" if best else "",
                      _signed(best["attribution"]) if best else "", _signed(best["ablation"]) if best else "")
        console.print(t)
    t = Table(title="slots whose removal lowers the whole target's log-probability most", title_justify="left")
    for c in ("pos", "predicts", "layer", "head", "slot", "ablation Δlogp", "attribution"):
        t.add_column(c, justify="right")
    for r in d["summary"]:
        t.add_row(str(r["position"]), esc(repr(r["predicts"])), str(r["layer"]), str(r["head"]), str(r["slot"]),
                  _signed(r["ablation"]), _signed(r["attribution"]))
    console.print(t)
    console.print("[dim]attribution: direct logit attribution to the token predicted at that position (final-norm "
                  "scale frozen); ablation: Δ log-prob of the whole target when the slot is dropped (other weights "
                  "renormalised); promotes/suppresses: tokens the value row raises/lowers most (--json has the "
                  "logits)[/]")
    if "positions" in d:
        t = Table(title="every position (scoring the next token)", title_justify="left")
        for c in ("pos", "token", "scored", "p", "rank", "top slot (layer/head/slot)", "attribution", "ablation Δlogp"):
            t.add_column(c)
        for p in d["positions"]:
            best = p["top_slots"][0] if p["top_slots"] else None
            t.add_row(str(p["position"]), esc(p["token"]), esc(p["scored"]["token"]), f"{p['scored']['prob']:.3f}",
                      str(p["scored"]["rank"]), f"{best['layer']}/{best['head']}/{best['slot']}" if best else "",
                      _signed(best["attribution"]) if best else "", _signed(best["ablation"]) if best else "")
        console.print(t)


def _signed(x: float) -> str:
    color = "green" if x > 0 else "red" if x < 0 else "dim"
    return f"[{color}]{x:+.3f}[/]"


def _inspect_fact(fact_id: str, facts: Optional[Path], heldout: bool, model: Optional[str], dtype: Optional[str],
                  json: bool, device: Optional[str] = None) -> None:
    from memedit.errors import MemeditError
    from memedit.tracing.trace import trace_fact
    from memedit.world.facts import load_facts, world_of

    with _loaded(model, dtype, device) as m:
        if facts is not None:
            found = [f for f in load_facts(facts) if f.id == fact_id]
            if not found:
                raise MemeditError(f"unknown fact id {fact_id!r} in {facts}")
            f = found[0]
        else:
            f = world_of(m).fact(fact_id)
        ft = trace_fact(m, f, heldout_in_core=heldout)
    if json:
        return print_json(ft.to_dict())
    console.print(f"[bold]fact[/] {esc(f.id)}: {esc(f.prompt.replace('{}', f.subject))} "
                  f"[bold green]{esc(f.target_true)}[/] ({len(ft.phrasings)} phrasings)")
    t = Table()
    for c in ("phrasing", "p(target)", "first-token rank", "top", "slots to drop to flip"):
        t.add_column(c, justify="left" if c == "phrasing" else "right")
    for p in ft.phrasings:
        flip = "n/a" if not p["answered"] else ("none flips" if p["flip"] is None else str(p["flip"]))
        phrasing = esc(p["prompt"]) + (" [dim](held-out)[/]" if p["heldout"] else "")
        t.add_row(phrasing, f"{p['prob']:.3f}", str(p["rank"]), esc(p["top"]), flip)
    console.print(t)
    console.print(f"[bold]core set[/]: {ft.core_size} slots selected at the answer position by all {ft.core_over} "
                  f"{'phrasings' if heldout else 'training phrasings (--heldout adds the held-out ones)'}")
    for table, slots in ft.core_set.items():
        shown = ", ".join(map(str, slots[:40])) + (" ..." if len(slots) > 40 else "")
        console.print(f"  table {table}: {len(slots)} slots {shown}")


@command(app, "trace-causal")
def trace_causal(
    prompt: Annotated[str, typer.Argument(help="The prompt (it must contain the subject).")],
    subject: Annotated[str, typer.Option("--subject", "-s", help="Words of the prompt to corrupt with noise.")],
    target: Annotated[str, typer.Option("--target", "-t", help="The answer whose probability is measured.")],
    samples: Annotated[int, typer.Option("--samples", min=1, max=limits.MAX_CAUSAL_SAMPLES,
                                         help=f"Noise samples averaged (at most {limits.MAX_CAUSAL_SAMPLES:,}).")] = 10,
    noise: Annotated[float, typer.Option("--noise", callback=finite(0.0, limits.MAX_NOISE),
                                         help="Noise std as a multiple of the embedding std (0 to "
                                              f"{limits.MAX_NOISE:g}).")] = 3.0,
    seed: Annotated[int, typer.Option("--seed", min=-limits.INT64_MAX - 1, max=limits.INT64_MAX,
                                      help="Seed of the noise draws.")] = 0,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Save the heat map as PNG (needs matplotlib).")]
    = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json: JsonOpt = False,
) -> None:
    """Memory causal tracing: corrupt the subject, restore one memory layer at one position at a time.

    ROME's protocol (noise 3x the embedding std, 10 samples); prints the indirect effect
    P(target | restored) - P(target | corrupted) for every (position, memory layer) as a heat map.

    Example: memedit trace-causal "Reidreir was born in" --subject Reidreir --target Shoushour --plot trace.png
    """
    from memedit.tracing.causal import causal_trace
    from memedit.tracing.causal import plot as save_plot

    with _loaded(model, dtype, device) as m:
        ct = causal_trace(m, prompt, subject, target, samples=samples, noise=noise, seed=seed)
    if plot is not None:
        save_plot(ct, plot)
    if json:
        d = ct.to_dict()
        if plot is not None:
            d["plot"] = str(plot)
        return print_json(d)
    console.print(f"[bold]prompt[/] {esc(repr(prompt))}, subject {esc(repr(subject))} (positions "
                  f"{ct.subject_positions}), target {esc(repr(ct.target.text))} ({ct.target.n_tokens} token(s), "
                  "scored whole)")
    if ct.target.note:
        console.print(f"[yellow]{esc(ct.target.note)}[/]")
    console.print(f"P(target): clean {ct.clean_prob:.4f}, corrupted {ct.corrupted_prob:.4f} "
                  f"(noise {noise}x embedding std, {samples} samples, seed {seed})")
    ie = ct.indirect_effect
    top = max(float(ie.abs().max()), 1e-9)
    t = Table(title="indirect effect: P(restored) - P(corrupted)", title_justify="left")
    t.add_column("pos")
    t.add_column("token")
    for L in ct.layers:
        t.add_column(f"memory {L}", justify="right")
    for pos, tok in enumerate(ct.tokens):
        cells = []
        for c in range(len(ct.layers)):
            x = float(ie[pos, c])
            level = int(255 - 200 * min(1.0, max(0.0, x) / top))
            cells.append(f"[black on rgb({level},{level},255)] {x:+.3f} [/]")
        mark = "*" if pos in ct.subject_positions else ""
        t.add_row(str(pos), esc(repr(tok)) + mark, *cells)
    console.print(t)
    console.print("[dim]* subject token (corrupted)[/]")
    if plot is not None:
        console.print(f"wrote {plot}")
