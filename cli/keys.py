"""memedit keys ...: adapt sub-keys online, route a new fact to a free slot, apply or revert key patches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from memedit import limits
from memedit.keyspace.config import KEYS

from .common import DeviceOpt, JsonOpt, ModelOpt, app, command, console, esc, load_model, print_json
from .validate import finite

keys_app = typer.Typer(help="Change sub-keys: online adaptation, routing a fact to a free slot, key patches.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")

OutOpt = Annotated[Optional[Path],
                   typer.Option("--out", "-o", help="Patch file to write (default: "
                                                    "MODEL/memedit/patches/ID.safetensors).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Measure only; write nothing.")]


@command(keys_app, "adapt")
def adapt_cmd(
    corpus: Annotated[Path, typer.Argument(help="Text to adapt to, one passage per line.")],
    steps: Annotated[int, typer.Option(min=1, max=limits.MAX_ADAPT_STEPS,
                                       help="Update steps (one batch each, cycling through the text; at most "
                                            f"{limits.MAX_ADAPT_STEPS:,}).")] = KEYS.steps,
    batch_size: Annotated[int, typer.Option(min=1, max=limits.MAX_BATCH_SIZE,
                                            help=f"Passages per step (at most {limits.MAX_BATCH_SIZE:,}).")
                          ] = KEYS.batch_size,
    lr: Annotated[float, typer.Option(callback=finite(0.0, limits.MAX_LR),
                                      help=f"SGD learning rate for the sub-keys (0 to {limits.MAX_LR:g}).")] = KEYS.lr,
    layer: Annotated[Optional[list[int]], typer.Option(help="Only these memory layers (repeatable).")] = None,
    probe: Annotated[Optional[Path],
                     typer.Option(help="Background text whose lookups measure collateral (default: a sample of the "
                                       "world corpus).")] = None,
    exact_index: Annotated[bool,
                           typer.Option("--exact-index", help="Keep an incrementally updated FAISS index of every "
                                                              "head's N² slot keys and check the probe lookups "
                                                              "against it (N² × K floats per head).")] = False,
    out: OutOpt = None,
    dry_run: DryRunOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Adapt the sub-keys online to CORPUS: each step moves only sub-keys that entered a stage-1 top-k in its batch.

    Frozen sub-keys (memedit/frozen.safetensors, "keys.layer{L}") stay fixed. Saves a reversible key patch and
    applies it to the model folder, recorded in `memedit patch log` (undo with `memedit keys revert PATCH`).

    Example: memedit keys adapt heldout.txt --model ./my-model --steps 30
    """
    from memedit.keyspace.adapt import adapt
    from memedit.keyspace.subkeys import probe_texts_for
    from memedit.storage.checkpoint import require_writable
    from memedit.storage.corpus import read_texts
    from memedit.storage.patch import apply_held

    m = load_model(model, device=device)
    if not dry_run:
        require_writable(m)
    texts = read_texts(corpus, "corpus")
    probe_texts, probe_from = probe_texts_for(m, read_texts(probe, "probe text") if probe is not None else None,
                                              str(probe), fallback=texts)
    if not json and probe is None and not m.meta.get("world"):
        console.print(f"note: collateral is measured on {probe_from}; pass --probe FILE for separate background text")

    def show(st) -> None:
        if not json:
            console.print(f"step {st.step:3d}  loss {st.loss:.4f}  sub-keys changed {st.subkeys_changed:5d}"
                          + (f"  slots re-indexed {st.slots_reindexed:,}" if exact_index else ""))

    res = adapt(m, texts, probe_texts, steps=steps, batch_size=batch_size, lr=lr, layers=layer,
                check_exact=exact_index, progress=show)
    path = None
    if not dry_run and res.patch.changes:
        res.patch.info["corpus"] = str(corpus)
        path = apply_held(m, res.patch, out)
    d = res.to_json() | {"patch": str(path) if path else None, "patch_rows": res.patch.n_rows}
    if json:
        return print_json(d)
    console.print(f"loss on {corpus}: {res.loss_before:.4f} -> {res.loss_after:.4f}; on the probe text: "
                  f"{res.probe_loss_before:.4f} -> {res.probe_loss_after:.4f}")
    console.print(f"sub-keys changed: {res.subkeys_changed:,} of {res.subkeys_total:,} "
                  f"({res.frozen_skipped:,} frozen ones left alone); collateral: {res.collateral:.2%} of "
                  f"{res.probe_lookups:,} probe positions' lookups changed, {res.slots_replaced:.2%} of their slots "
                  "replaced")
    if exact_index:
        console.print(f"exact check: {res.exact_lookups:,} probe lookups vs the incrementally updated FAISS index, "
                      f"{res.exact_mismatches} mismatches")
    console.print(f"wrote patch {path} and applied it" if path else "nothing written (--dry-run or no change)")


@command(keys_app, "revert")
def revert_cmd(
    patch: Annotated[Path, typer.Argument(help="A key patch written by `keys adapt` or `keys route`.")],
    model: ModelOpt = None,
) -> None:
    """Put back the rows a key patch replaced (refused if they changed since), as `memedit patch revert` does.

    Example: memedit keys revert my-model/memedit/patches/1a2b3c4d5e6f.safetensors --model ./my-model
    """
    from memedit.storage.patch import revert

    p, _ = revert(load_model(model), patch)
    console.print(f"reverted {p.n_rows} rows from {patch}")


@command(keys_app, "apply")
def apply_cmd(
    patch: Annotated[Path, typer.Argument(help="A key patch written by `keys adapt` or `keys route`.")],
    model: ModelOpt = None,
) -> None:
    """Apply a key patch again (refused unless the model holds the patch's old rows).

    Example: memedit keys apply patch.safetensors --model ./my-model
    """
    from memedit.storage.patch import Patch, apply

    p = Patch.load(patch)
    apply(load_model(model), p)
    console.print(f"applied {p.n_rows} rows from {patch}")


@command(keys_app, "route")
def route_cmd(
    prompt: Annotated[str, typer.Option(help='The fact\'s prompt, "{}" marks the subject.')],
    subject: Annotated[str, typer.Option(help="The subject filled into the prompt.")],
    target: Annotated[str, typer.Option(help="The answer the model must predict.")],
    slot: Annotated[str, typer.Option(help="Slot id to write into, or 'auto' (an unused slot).")] = "auto",
    layer: Annotated[Optional[int], typer.Option(help="Memory layer to route in (default: the cheapest).")] = None,
    head: Annotated[Optional[int], typer.Option(help="Head to route in (default: the cheapest).")] = None,
    margin: Annotated[float,
                      typer.Option(callback=finite(0.0, 1e6),
                                   help="How far above the k-th score to place the slot, as a share of its head's "
                                        "score spread.")] = KEYS.margin,
    eval_facts: Annotated[int,
                          typer.Option(min=0, help="Other facts of the world to measure collateral on "
                                                   "(0 = all).")] = KEYS.eval_facts,
    probe: Annotated[Optional[Path],
                     typer.Option(help="Background text for collateral and slot usage "
                                       "(default: the world corpus).")] = None,
    out: OutOpt = None,
    dry_run: DryRunOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Write a new fact into a free slot: move that slot's two sub-keys just enough for the fact's query to select
    it, train its value row to predict TARGET, and report collateral on background lookups and the other facts.

    Example: memedit keys route --prompt "{} was born in" --subject Reidreir --target museum --model ./my-model
    """
    from memedit.errors import MemeditError
    from memedit.keyspace.route import route, route_texts
    from memedit.storage.checkpoint import require_writable
    from memedit.storage.corpus import read_texts
    from memedit.storage.patch import apply_held

    m = load_model(model, device=device)
    if not dry_run:
        require_writable(m)
    if slot != "auto" and not slot.lstrip("-").isdigit():
        raise MemeditError(f"--slot must be a slot id or 'auto', got {slot!r}")
    background, probe_texts, facts = route_texts(m, read_texts(probe, "probe text") if probe is not None else None,
                                                 eval_facts)
    res = route(m, prompt, subject, target, slot=None if slot == "auto" else int(slot), layer=layer, head=head,
                background_texts=background, probe=probe_texts, facts=facts, margin=margin)
    path = None if dry_run else apply_held(m, res.patch, out)
    d = res.to_json() | {"patch": str(path) if path else None}
    if json:
        return print_json(d)
    t = Table(title=f"routed {prompt.format(subject) if '{}' in prompt else prompt!r} -> {target!r}")
    t.add_column("")
    t.add_column("value")
    t.add_row("slot", f"{res.slot} = ({res.subkeys[0]}, {res.subkeys[1]}) in layer {res.layer} head {res.head}")
    t.add_row("chosen as", f"{res.slot_choice}, {res.slot_uses} background uses")
    t.add_row("sub-keys moved", f"|Δ| {res.moved[0]:.4f} and {res.moved[1]:.4f} (norms {res.subkey_norms[0]:.3f}, "
                                f"{res.subkey_norms[1]:.3f})")
    t.add_row("selected", f"rank {res.rank} of the head's top-k, weight {res.weight:.3f}")
    before, after = esc(repr(res.predicted_before)), esc(repr(res.predicted_after))
    t.add_row("prediction", f"{before} (p(target) {res.p_before:.3f}) -> {after} (p "
                            f"{res.p_after:.3f})")
    t.add_row("probe collateral", f"{res.collateral:.2%} of background lookups changed ({res.slots_replaced:.2%} of "
                                  f"slots); {res.probe_selecting_slot} select the slot")
    if res.facts_checked:
        t.add_row("other facts", f"accuracy {res.facts_accuracy_before:.2%} -> {res.facts_accuracy_after:.2%} "
                  f"over {res.facts_checked:,} prompts (drop {d['accuracy_drop_points']:.2f} points)")
    console.print(t)
    console.print(f"wrote patch {path} and applied it" if path else "nothing written (--dry-run)")
