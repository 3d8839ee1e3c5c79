"""Real models: a reference-layout checkpoint (lingua's bytes tokenizer, bf16 values, a padded vocabulary) and a
user's model with no facts world, only the user's text. Targets are token sequences everywhere."""

from __future__ import annotations

import json

import pytest
import torch

import memedit
from memedit.tracing.targets import score, tokenize_target

from .conftest import write_texts
from .reference_layout import params, reference_forward, reference_state, write_consolidated

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A consolidated reference checkpoint with vocab_size 260 (bytes tokenizer: 258 ids) and bf16 values."""
    root = tmp_path_factory.mktemp("real")
    p = params(vocab_size=260)
    state = reference_state(p)
    write_consolidated(root / "step", state, p)
    text = write_texts(root / "text.txt", [f"The capital of country {i} is city {i * 7 % 13}." for i in range(40)])
    return state, p, root / "step", text


def test_a_multi_byte_target_is_scored_by_all_its_bytes(ref, cli):
    state, p, step, _ = ref
    code, out, err = cli("inspect", PROMPT, "--target", " Paris", "--model", step, "--json")
    assert code == 0, err
    tg = json.loads(out)["target"]
    assert tg["tokens"] == list("Paris") or tg["tokens"] == [" ", "P", "a", "r", "i", "s"]
    ids = [256] + list(PROMPT.encode())
    want = list(b" Paris")
    assert tg["token_ids"] == want and tg["n_tokens"] == 6 and tg["joined"]
    # an independent float64 forward from the raw state dict (rounding the value mix to bf16 as the reference
    # kernel does) over prompt + target: the sum of the target bytes' log-probs
    logits, _ = reference_forward(state, p, ids + want[:-1])
    lp = torch.log_softmax(logits, -1)
    ref_logprob = sum(float(lp[len(ids) - 1 + i, b]) for i, b in enumerate(want))
    assert tg["logprob"] == pytest.approx(ref_logprob, abs=1e-4)
    assert tg["mean_logprob"] == pytest.approx(ref_logprob / 6, abs=1e-4)
    assert tg["first_rank"] >= 1 and len(json.loads(out)["per_token"]) == 6


def test_export_of_a_padded_vocabulary_opens_in_xarray(ref, cli, tmp_path):
    xr = pytest.importorskip("xarray")
    _, _, step, _ = ref
    code, _, err = cli("export", "--out", tmp_path / "e.h5", "--top-tokens", "4", "--model", step)
    assert code == 0, err
    with xr.open_dataset(tmp_path / "e.h5", engine="h5netcdf") as ds:
        top = ds["top_tokens"].values
        assert top.shape[-1] == 4 and top.max() < 258  # ids 258, 259 are padding: the tokenizer cannot decode them
        assert list(ds["vocab"].values[256:]) == ["<bos>", "<eos>", "<id 258>", "<id 259>"]


def test_an_edit_with_a_multi_byte_target_survives_conversion_to_lingua(ref, cli, tmp_path):
    _, _, step, text = ref
    native, back = tmp_path / "native", tmp_path / "lingua"
    assert cli("convert", native, "--model", step)[0] == 0
    assert cli("background", text, "--model", native)[0] == 0
    # a random model: the edit changes much of its text, so the guard refuses it unless forced (what is tested
    # here is the conversion of the edited rows)
    code, out, err = cli("edit", "--prompt", "The capital of {} is", "--subject", "France", "--target-new", " Rome",
                         "--model", native, "--json")
    assert code == 1 and json.loads(out)["edits"][0]["status"] == "refused"
    code, out, err = cli("edit", "--prompt", "The capital of {} is", "--subject", "France", "--target-new", " Rome",
                         "--model", native, "--json", "--force")
    assert code == 0, err
    e = json.loads(out)["edits"][0]
    assert e["status"] == "forced"
    old = e["request"]["target_true"]
    assert old and old != "Rome" and e["efficacy"] == 1.0
    for folder in (native, back):
        if folder == back:
            assert cli("convert", back, "--format", "lingua", "--model", native)[0] == 0
            assert (back / "consolidated.pth").is_file() or any(back.rglob("consolidated.pth"))
        m = memedit.load(folder)
        new, true = score(m, [PROMPT, PROMPT], ["Rome", old])
        assert len(new.tokens.ids) == 5  # " Rome": five bytes, all scored
        assert new.mean_logprob > true.mean_logprob  # whole targets compare by mean log-prob (CounterFact)


def test_the_tokens_of_a_target_follow_the_prompt(ref):
    _, _, step, _ = ref
    m = memedit.load(step)
    tt = tokenize_target(m, PROMPT + " ", "Paris")  # a prompt ending in a space: its tokens stay a prefix
    assert tt.joined and bytes(tt.ids) == b"Paris"
    assert bytes(tokenize_target(m, PROMPT, "  Paris ").ids) == b" Paris"  # the target is stripped


@pytest.mark.parametrize("args", [
    ["inspect", PROMPT, "--target", " Paris"],
    ["inspect", "The [/b] capital of {x} [bold]France is", "--target", "[/b]"],
    ["inspect", PROMPT],
    ["trace-causal", PROMPT, "--subject", "France", "--target", " Paris", "--samples", "2"],
    ["generate", "a {} b [/i]", "-n", "3"],
    ["background"],
    ["background", "TEXT"],
    ["audit"],
    ["audit", "TEXT", "--out", "OUT/a.h5"],
    ["verify"],
    ["verify", "--corpus", "TEXT"],
    ["export", "--out", "OUT/e.h5"],
    ["keys", "adapt", "TEXT", "--steps", "2"],
    ["keys", "route", "--prompt", "{} is in", "--subject", "x", "--target", "Rome"],
    ["keys", "route", "--prompt", "{} is in", "--subject", "x", "--target", "R", "--probe", "TEXT"],
    ["edit", "--prompt", "The capital of {} is", "--subject", "France", "--target-new", "Rome", "--steps", "3"],
    ["edit", "--prompt", "The { capital } of {} is {", "--subject", "France", "--target-new", "[/b]",
     "--steps", "3", "--ranking", "counts"],
    ["edit", "--fact", "f00001"],
    ["inspect", "--fact", "f00001"],
])
def test_a_user_model_with_only_text_exits_0_or_gives_the_real_reason(ref, cli, tmp_path, args):
    """Every flow on a user's model (no facts world): exit 0, or exit 2 with one line naming what is missing."""
    _, _, step, text = ref
    native = tmp_path / "native"
    assert cli("convert", native, "--model", step)[0] == 0
    (tmp_path / "out").mkdir()
    args = [str(a).replace("TEXT", str(text)).replace("OUT", str(tmp_path / "out")) for a in args]
    code, out, err = cli(*args, "--model", native)
    assert code in (0, 2), (code, out, err)
    if code == 2:
        line = err.strip()
        assert len(line.splitlines()) == 1 and line.startswith("error:") and "Traceback" not in line
        assert "facts world" not in line  # the real reason, not "this model records no facts world"


def test_an_unknown_word_target_is_refused_on_a_word_level_model(tiny, cli, tmp_path):
    _, path = tiny  # a word-level vocabulary (the demo's byte-level BPE can spell any word)
    code, _, err = cli("edit", "--prompt", "{} was born in", "--subject", "Reidreir", "--target-new", "Zzqqxx",
                       "--dry-run", "--forgetting-sample", "0", "--ranking", "counts", "--model", path)
    assert code == 2 and "not in the model's vocabulary" in err and len(err.strip().splitlines()) == 1


def test_single_edits_on_a_bpe_model_hold_whole_targets(tmp_path):
    """A small model with a BPE tokenizer (every object 2+ tokens): single edits, each measured then undone."""
    import random

    from memedit.editing import background as B
    from memedit.editing.patch import write_rows
    from memedit.editing.sparse_ft import EditConfig, EditRequest, edit, measure

    from .bpe_world import bpe_model

    model, _, world = bpe_model(tmp_path)
    bg = B.compute(model, world.training_sentences(), 32, 1000, corpus="the fixture world")
    facts = random.Random(0).sample(world.facts, 20)
    assert all(len(tokenize_target(model, f.training_prompts[0], f.target_new).ids) >= 2 for f in facts)
    rows = []
    for f in facts:
        req = EditRequest.from_fact(f)
        res = edit(model, [req], bg, EditConfig())
        write_rows(model, res.patch, new=True)
        rows.append(measure(model, req))
        write_rows(model, res.patch, new=False)

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals)

    # measured: efficacy 100 %, exact match 100 %, neighbourhood 100 % (20 facts, seed 0)
    assert mean("efficacy") >= 0.95 and mean("exact_match") >= 0.9 and mean("neighborhood") >= 0.9
