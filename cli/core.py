"""First commands: info, generate, facts, convert, train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from memedit import limits

from .common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    TokenizerOpt,
    app,
    command,
    console,
    esc,
    load_model,
    print_json,
)


@command(app)
def info(model: ModelOpt = None, dtype: DtypeOpt = None, tokenizer: TokenizerOpt = None, json: JsonOpt = False) -> None:
    """Show the model's structure: memory layers, slots, heads, value tables and who reads them.

    Example: memedit info --json
    """
    from memedit.storage.info import describe

    d = describe(load_model(model, dtype, tokenizer, header_only=True))  # headers and config: no weights read
    if json:
        return print_json(d)
    console.print(f"[bold]model[/] {d['source']}{' (bundled, read-only)' if d['read_only'] else ''}")
    if d["standalone"]:
        console.print(f"standalone memory module (no host LM, no tokenizer): input dim {d['dim']}, dtype {d['dtype']}")
    else:
        console.print(f"dim {d['dim']}, {d['n_layers']} layers, vocab {d['vocab_size']}, dtype {d['dtype']}")
    kinds = " ".join(f"[{'bold magenta' if x['kind'] == 'memory' else 'dim'}]{x['layer']}:{x['kind']}[/]"
                     for x in d["layers"])
    console.print(f"layers {kinds}")
    t = Table(title="memory")
    for c in ("slots", "N", "heads", "k", "K", "V", "swilu", "gated"):
        t.add_column(c, justify="right")
    t.add_row(f"{d['n_slots']:,}", str(d["n_keys"]), str(d["heads"]), str(d["knn"]), str(d["k_dim"]),
              str(d["v_dim"]), str(d["swilu_projection"]), str(d["gated"]))
    console.print(t)
    t = Table(title="value tables")
    for c in ("table", "read by layers", "rows", "dim", "dtype"):
        t.add_column(c)
    for tb in d["tables"]:
        t.add_row(tb["name"], ", ".join(map(str, tb["layers"])), f"{tb['rows']:,}", str(tb["dim"]), tb["dtype"])
    console.print(t)
    p = d["params"]
    console.print(f"parameters: {p['total']:,} total, {p['memory']:,} memory ({p['values']:,} in value rows), "
                  f"{p['dense']:,} dense")


@command(app)
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, max=limits.MAX_GENERATE_TOKENS,
                                            help="Tokens to generate (at most "
                                                 f"{limits.MAX_GENERATE_TOKENS:,}, and the prompt plus them at most "
                                                 "the model's context).")] = 8,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    tokenizer: TokenizerOpt = None,
    json: JsonOpt = False,
) -> None:
    """Greedy continuation of PROMPT.

    Example: memedit generate "Reidreir was born in"
    """
    from memedit.lm.generate import generate as gen

    out = gen(load_model(model, dtype, tokenizer, device), prompt, max_tokens)
    if json:
        return print_json(out)
    console.print(f"{esc(prompt)} [bold green]{esc(out['completion'].lstrip())}[/]")  # BPE pieces start with a space


@command(app)
def facts(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for facts.jsonl and corpus.txt; with --format "
                                      "counterfact or zsre, the JSON file to write.")] = Path("world"),
    format: Annotated[str, typer.Option("--format", help="memedit (facts.jsonl and corpus.txt), or counterfact or "
                                        "zsre: edit requests as those datasets ship them (one JSON array).")]
    = "memedit",
    facts_file: Annotated[Optional[Path], typer.Option("--facts", help="Facts JSONL to write (default: the model's "
                                                       "own world).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N facts.")] = None,
    model: ModelOpt = None,
) -> None:
    """Write the demo world's facts (JSONL edit requests) and its text corpus, or its facts as CounterFact or ZsRE
    records that `memedit edit --requests` reads back.

    Example: memedit facts --out world/
    Example: memedit facts --format counterfact --out counterfact.json
    """
    from memedit.errors import MemeditError
    from memedit.world.facts import load_facts, world_of

    if format not in ("memedit", "counterfact", "zsre"):
        raise MemeditError(f"unknown --format {format!r} (choose memedit, counterfact or zsre)")
    if format == "memedit":
        if facts_file is not None or limit is not None:
            raise MemeditError("--facts and --limit go with --format counterfact or zsre")
        fpath, cpath = world_of(load_model(model)).write(out)
        console.print(f"wrote {fpath} and {cpath}")
        return
    from memedit.editing import formats as FM
    from memedit.storage.checkpoint import atomic_write_text, check_output

    if out == Path("world") or out.is_dir():
        out = out / f"{format}.json"
    if facts_file is not None:
        items = load_facts(facts_file)
        m = None
    else:
        m = load_model(model, header_only=True)
        items = world_of(m).facts
    check_output(m, out)
    every = items
    items = items[:limit] if limit is not None else items
    for f in items:
        if not f.target_new.strip():
            raise MemeditError(f"fact {f.id} has no target_new: {format} records need a new target")
    records = FM.to_counterfact(items) if format == "counterfact" else FM.to_zsre(items, every)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, FM.dumps(records))
    console.print(f"wrote {len(records)} {format} records to {out}")


@command(app)
def convert(
    dst: Annotated[Path, typer.Argument(help="Destination folder (must not exist or be empty).")],
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    tokenizer: TokenizerOpt = None,
    format: Annotated[str, typer.Option("--format", help="native (a memedit folder) or lingua (the reference's "
                                        "params.json + consolidated.pth).")] = "native",
    knn: Annotated[Optional[int], typer.Option("--knn", min=1, help="Slots per head of a standalone XLM / "
                                               "product-key-memory module (not stored in its state dict; "
                                               "default 32).")] = None,
    link: Annotated[bool, typer.Option("--link", help="Do not copy the weights: the new folder's base is the DCP "
                                       "step folder itself, read-only (it must stay where it is, unchanged); "
                                       "memedit's row log and state live beside it.")] = False,
) -> None:
    """Write a model (default: the bundled one) as a native memedit folder you can change, or back to the reference
    layout.

    Example: memedit convert ./my-model --model ./checkpoints/0000010000
    Example: memedit convert ./my-model --model ./checkpoints/0000010000 --link   (no copy of the weights)
    Example: memedit convert ./for-eval --format lingua --model ./my-model
    """
    from memedit.errors import MemeditError
    from memedit.storage.checkpoint import check_output_folder, save

    if format not in ("native", "lingua"):
        raise MemeditError(f"unknown --format {format!r} (choose native or lingua)")
    if link and (format != "native" or dtype is not None):
        raise MemeditError("--link writes a native folder over the checkpoint as stored: drop --format and --dtype")
    m = load_model(model, dtype, tokenizer, **({"knn": knn} if knn else {}))
    check_output_folder(m, dst)  # before any work: a new path, outside the model's own folder
    if format == "lingua":
        from memedit.storage.importers.lingua import save_lingua

        save_lingua(m, dst)
    else:
        from memedit.editing.background import carry

        if link:
            from .common import StepProgress

            with StepProgress("fingerprinting", "bytes") as bar:
                save(m, dst, link=True, progress=bar)
        else:
            carry(m, save(m, dst))  # the bundled demo's background statistics come along
    console.print(f"wrote {dst}{' (params.json + consolidated.pth)' if format == 'lingua' else ''}"
                  f"{f' (linked to {m.source}, read-only)' if link else ''}")


@command(app)
def train(
    out: Annotated[Path,
                   typer.Option("--out", "-o", help="Folder to write the trained model to.")] = Path("demo-model"),
    epochs: Annotated[Optional[int],
                      typer.Option(min=1, max=limits.MAX_EPOCHS, help="Passes over the world's training sentences (default: the bundled "
                                              "model's).")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, max=limits.INT64_MAX,
                                                help="World and initialisation seed (default 1234).")] = None,
    device: Annotated[str, typer.Option(help="torch device to train on: cpu, cuda, cuda:1 ...")] = "cpu",
    json: JsonOpt = False,
) -> None:
    """Train a memory model on the synthetic world (the defaults reproduce the bundled demo model).

    Example: memedit train --out demo-model
    """
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from memedit.storage.checkpoint import check_device, check_output_folder, save
    from memedit.world.evaluate import fact_accuracies
    from memedit.world.train import TrainConfig
    from memedit.world.train import train as run

    check_output_folder(None, out)  # before training, not after it
    check_device(device)
    tc = TrainConfig()
    if epochs is not None:
        tc.epochs = epochs
    if seed is not None:
        tc.seed = seed
    tc.device = device
    t0 = time.time()
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, disable=json) as bar:
        task = bar.add_task("train", total=None, loss=float("nan"))

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=loss)

        m, world = run(tc, progress)
    seconds = time.time() - t0
    save(m, out)
    acc = fact_accuracies(m, world.facts)
    zero = fact_accuracies(m, world.facts, zero_memory=True)
    res = {"out": str(out), "seconds": round(seconds, 1), "accuracy": acc, "accuracy_memory_zeroed": zero}
    if json:
        return print_json(res)
    console.print(f"wrote {out} in {seconds:.0f}s")
    console.print(f"whole-answer accuracy: training wordings {acc['train']:.1%}, held-out wordings (seen with other "
                  f"subjects) {acc['heldout']:.1%}, never-seen wordings {acc['unseen']:.1%}")
    console.print(f"with memory zeroed: training wordings {zero['train']:.1%}")
