"""Fact edits as a user makes them: background statistics, `memedit edit` (single, batch, sequential, dry run),
metrics right after each edit, revert byte for byte, frozen rows bit-identical after hundreds of operations."""

from __future__ import annotations

import contextlib
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from memedit.editing.patch import apply, revert
from memedit.editing.sparse_ft import EditConfig, EditRequest, edit, fact_counts, measure, rank, select
from memedit.storage.checkpoint import load

from .conftest import TINY_TEXTS

REQUEST = {"id": "r1", "prompt": "{} was born in", "subject": "Reidreir", "target_new": "park",
           "paraphrases": ["the Reidreir was born in"], "heldout_paraphrases": ["Reidreir Reidreir was born in"],
           "neighborhood": ["the cat sat on"]}
# A small fixed budget for the random tiny model: 24 rows, counted where the answer is read (with rows counted at
# every position, 24 rows of a random model's prompt positions need not include one that moves the answer).
# The guard is not what these tests check: the random model's edits change much of its three-sentence corpus
# (62 % of the greedy tokens of the sentences without the subject) and some do not reach p > 1/2 on every token in
# 40 steps, so they are committed over the guard (--force); tests/test_safe_edits.py tests the guard.
FAST = ["--top-t", "24", "--lr", "2", "--steps", "40", "--positions", "answer", "--force"]


@pytest.fixture
def folder(tiny, tmp_path, cli):
    """The tiny model folder with background statistics computed on a small corpus."""
    model, path = tiny
    (tmp_path / "corpus.txt").write_text("\n".join(TINY_TEXTS * 20) + "\n")
    code, out, err = cli("background", tmp_path / "corpus.txt", "-m", path, "--batch-size", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["n_batches"] == 20
    return model, path


def test_background_is_stored_per_table(folder):
    model, path = folder
    bg = load_file(str(path / "memedit" / "background.safetensors"))
    df, counts = bg["df.shared"], bg["counts.shared"]
    assert df.shape == counts.shape == (model.table("shared").n_rows,)
    assert int(df.max()) <= 20 and (df <= counts).all() and (counts[df == 0] == 0).all()
    # every token reads heads * k slots in each of the two memory layers that share the table
    n_tokens = sum(len(model.encode(t)) for t in TINY_TEXTS) * 20
    assert int(counts.sum()) == n_tokens * 2 * 4 * 2


def test_edit_applies_a_patch_and_revert_restores_bytes(cli, folder, tmp_path):
    _, path = folder
    original = (path / "model.safetensors").read_bytes()
    (tmp_path / "req.jsonl").write_text(json.dumps(REQUEST) + "\n")
    code, out, err = cli("edit", "-m", path, "--requests", tmp_path / "req.jsonl", *FAST, "--json")
    assert code == 0, err
    (e,) = json.loads(out)["edits"]
    assert e["efficacy"] == 1.0 and e["paraphrase"] == 1.0
    assert {"paraphrase_heldout", "neighborhood", "score"} <= e.keys()
    assert 0 < e["rows_trained"] <= 24 and e["tables"] == {"shared": [0, 2]}
    assert e["request"]["target_true"]  # filled in with the model's own answer
    edited = load(path)
    assert measure(edited, EditRequest.from_dict(e["request"]))["efficacy"] == 1.0
    log = json.loads(cli("patch", "log", "-m", path, "--json")[1])
    assert log["applied"] == [e["patch"]] and log["entries"][0]["kind"] == "edit"
    assert cli("patch", "revert", e["patch"], "-m", path)[0] == 0
    assert (path / "model.safetensors").read_bytes() == original


def test_dry_run_and_table_output_leave_the_folder_unchanged(cli, folder):
    _, path = folder
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    code, out, err = cli("edit", "-m", path, "--prompt", "{} was born in", "--subject", "Reidreir",
                         "--target-new", "park", *FAST, "--dry-run")
    assert code == 0, err
    assert "dry run" in out and "efficacy" in out and "-> park" in out
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before


def test_sequential_requests_are_measured_right_after_each_edit(cli, folder, tmp_path):
    _, path = folder
    second = dict(REQUEST, id="r2", prompt="{} sat on", subject="cat", target_new="dog", paraphrases=[])
    (tmp_path / "req.jsonl").write_text(json.dumps(REQUEST) + "\n" + json.dumps(second) + "\n")
    code, out, err = cli("edit", "-m", path, "--requests", tmp_path / "req.jsonl", "--sequential", *FAST, "--json")
    assert code == 0, err
    edits = json.loads(out)["edits"]
    assert len(edits) == 2 and edits[0]["patch"] != edits[1]["patch"]
    assert all(e["efficacy"] == 1.0 for e in edits)
    assert len(json.loads(cli("patch", "log", "-m", path, "--json")[1])["applied"]) == 2
    # batch mode: one patch for both requests (new targets: the folder already gives the first ones)
    again = [dict(REQUEST, target_new="dog"), dict(second, target_new="park")]
    (tmp_path / "req2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in again))
    code, out, err = cli("edit", "-m", path, "--requests", tmp_path / "req2.jsonl", *FAST, "--dry-run", "--json")
    assert code == 0, err
    edits = json.loads(out)["edits"]
    assert len(edits) == 2 and edits[0]["patch"] == edits[1]["patch"]


def test_rankings_pick_rows_the_fact_reads(folder):
    from memedit.editing.background import stored

    model, _ = folder
    bg = stored(model)
    counts = fact_counts(model, ["Reidreir was born in"])
    for ranking in ("tfidf", "kl", "counts"):
        rows = select(model, rank(counts, bg, ranking), 10)["shared"]
        assert len(rows) == 10 and (counts["shared"][rows] > 0).all()
    # TF-IDF gives a slot read in every background batch no weight at all
    idf = bg.idf("shared")
    assert idf[bg.df["shared"] == bg.n_batches].max() < idf.max()


def test_edit_masks_frozen_rows_and_other_parameters(cli, folder):
    model, path = folder
    req = EditRequest.from_dict(REQUEST)
    first = edit(model, [req], None, EditConfig(top_t=24, ranking="counts", steps=40)).patch
    picked = first.changes[0].rows[:8].tolist()
    assert cli("freeze", "-m", path, "--rows", ",".join(map(str, picked)))[0] == 0
    model = load(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = edit(model, [req], None, EditConfig(top_t=24, ranking="counts", steps=40))
    assert not set(res.patch.changes[0].rows.tolist()) & set(picked)
    for k, v in model.state_dict().items():  # edit() leaves the model as it was; the patch holds the change
        assert torch.equal(v, state[k]), k


def test_edit_bad_input(cli, folder, tmp_path):
    _, path = folder
    code, _, err = cli("edit", "-m", path, "--prompt", "{} was born in", "--subject", "Reidreir")
    assert code == 2 and "--target-new" in err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    code, _, err = cli("edit", "-m", path, "--requests", tmp_path / "bad.jsonl")
    assert code == 2 and "bad.jsonl:1" in err and "target_new" in err
    code, _, err = cli("edit", "-m", path, "--prompt", "{} sat on", "--subject", "cat", "--target-new", "dog",
                       "--ranking", "nope")
    assert code == 2 and "unknown ranking" in err


def test_frozen_rows_stay_bit_identical_after_hundreds_of_operations(folder):
    """Freeze rows, then run 300 mixed operations (patches of every kind, fact edits, reverts, refused patches
    that touch frozen rows): the frozen rows never change by a single bit."""
    from memedit.editing.freeze import freeze
    from memedit.editing.patch import applied_ids, row_patch
    from memedit.errors import MemeditError

    model, path = folder
    rng = random.Random(0)
    n_rows = model.table("shared").n_rows
    frozen = sorted(rng.sample(range(n_rows), 40))
    freeze(model, {"shared": frozen})
    frozen_bytes = model.table("shared").weight[frozen].clone()
    req = EditRequest.from_dict(REQUEST)
    done = {"patch": 0, "refused": 0, "edit": 0, "revert": 0}
    for _ in range(300):
        op = rng.choice(["set", "add", "scale", "zero", "copy", "edit", "revert", "frozen"])
        try:
            if op == "edit" and done["edit"] < 6:
                p = edit(model, [req], None, EditConfig(top_t=24, ranking="counts", steps=5,
                                                        stop_token_loss=0)).patch
                assert not set(p.changes[0].rows.tolist()) & set(frozen)
                apply(model, p)
                done["edit"] += 1
            elif op == "revert" and applied_ids(model):
                revert(model, rng.choice(applied_ids(model)), force=True)
                done["revert"] += 1
            elif op == "frozen":
                row_patch(model, "add", "shared", [rng.choice(frozen)], scalar=1.0)
                raise AssertionError("a patch on a frozen row was not refused")
            elif op in ("set", "add", "scale", "zero", "copy"):
                rows = rng.sample(range(n_rows), rng.randint(1, 5))
                p = row_patch(model, op, "shared", rows, scalar=rng.uniform(-1, 1) if op != "zero" else None,
                              from_row=rng.randrange(n_rows) if op == "copy" else None)
                apply(model, p)
                done["patch"] += 1
        except MemeditError as e:
            assert "frozen" in str(e) or "changes nothing" in str(e), str(e)
            done["refused"] += 1
        assert torch.equal(model.table("shared").weight[frozen], frozen_bytes)
    assert done["patch"] > 100 and done["refused"] > 30 and done["edit"] == 6 and done["revert"] > 10
    on_disk = load(path).table("shared").weight[frozen]
    assert torch.equal(on_disk, frozen_bytes)


def test_dry_run_rewrites_a_fact_of_the_bundled_model_and_refuses_to_write_it(cli, demo):
    from memedit.world.facts import world_of

    fact = world_of(demo).facts[12]
    code, out, err = cli("edit", "--fact", fact.id, "--dry-run", "--ranking", "counts", "--forgetting-sample", "200",
                         "--json")
    assert code == 0, err
    (e,) = json.loads(out)["edits"]
    assert e["request"]["target_true"] == fact.target_true and e["request"]["target_new"] == fact.target_new
    assert e["efficacy"] == 1.0 and not e["applied"] and e["forgetting"]["n"] > 150
    code, _, err = cli("edit", "--fact", fact.id)
    assert code == 2 and "read-only" in err


# ---- sparse training: nothing the size of the table -----------------------------------------------------------
class LargestAllocation:
    """A torch dispatch mode recording the largest new storage any op allocates (views of inputs do not count)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor)}
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                        outer.largest = max(outer.largest, t.untyped_storage().nbytes())
                return out

        self.largest = 0
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_an_edit_allocates_nothing_the_size_of_the_value_table():
    from .conftest import tiny_model

    model = tiny_model(n_keys=256)  # 65,536 slots x 32: the table is 40x larger than any other tensor
    table = model.table("shared").weight
    before = table.clone()
    req = EditRequest.from_dict(REQUEST)
    cfg = EditConfig(top_t=16, lr=2.0, steps=20, ranking="counts")
    with LargestAllocation() as sparse:
        res = edit(model, [req], None, cfg)
    assert res.steps > 0 and len(res.slots["shared"]) == 16
    assert torch.equal(table, before)  # the model is unchanged: the patch carries the trained rows
    assert res.patch.changes[0].max_delta > 0
    assert sparse.largest < table.nbytes / 8, f"largest allocation {sparse.largest:,} B, table {table.nbytes:,} B"
    # the dense baseline, measured the same way, does allocate table-sized gradients: the check can fail
    with LargestAllocation() as dense:
        edit(model, [req], None, EditConfig(steps=1, stop_token_loss=0.0, train_all=True,
                                            ranking="counts"))
    assert dense.largest >= table.nbytes


def test_keep_pairs_that_contradict_the_edit_are_dropped():
    """A kept pair with the edit's own prompt, or with the old answer (the same fact in another wording, as keep_for
    returns it when a request from --prompt carries no fact id), would undo the edit: it is dropped."""
    from memedit.editing.sparse_ft import consistent_keep, keep_for
    from memedit.world.facts import Fact

    from .conftest import tiny_model

    def fact(i, prompt, answer):
        return Fact(id=i, relation="r", prompt=prompt, subject="Reidreir", target_true=answer, target_new="x",
                    paraphrases=[], heldout_paraphrases=[], neighborhood=[])

    req = EditRequest.from_dict(dict(REQUEST, target_true="Thakrian"))
    req.keep = keep_for(req, [fact("f1", "{} ran in", "Thakrian"), fact("f2", "{} sat on the", "mat")])
    req.keep.append(("Reidreir was born in", "Thakrian"))
    assert len(req.keep) == 3
    assert consistent_keep(req) == [("Reidreir sat on the", "mat")]
    res = edit(tiny_model(), [req], None, EditConfig(top_t=24, ranking="counts", steps=5, positions="answer"))
    assert [tuple(k) for k in res.patch.info["requests"][0]["keep"]] == [("Reidreir sat on the", "mat")]


def test_kept_facts_keep_the_answers_earlier_edits_gave(tiny):
    """A sibling fact an earlier edit rewrote is kept at its new answer (keeping the old one would undo that edit);
    the answers come from the folder's edit log, and a revert takes them back."""
    from memedit.editing.sparse_ft import edited_answers, edited_rows, keep_for
    from memedit.world.facts import Fact

    model, path = tiny
    req = EditRequest.from_dict(dict(REQUEST, target_true="Thakrian"))
    res = edit(model, [req], None, EditConfig(top_t=24, ranking="counts", steps=3, stop_token_loss=0))
    apply(model, res.patch)
    assert edited_answers(load(path)) == {"r1": "park", "Reidreir was born in": "park"}
    assert edited_rows(load(path))["shared"].tolist() == sorted(res.patch.changes[0].rows.tolist())  # --protect edits
    facts = [Fact(id="r1", relation="r", prompt="{} was born in", subject="Reidreir", target_true="Thakrian",
                  target_new="x", paraphrases=[], heldout_paraphrases=[], neighborhood=[])]
    sibling = EditRequest.from_dict(dict(REQUEST, id="r2", prompt="{} sat on the", target_new="mat"))
    assert keep_for(sibling, facts) == [("Reidreir was born in", "Thakrian")]
    assert keep_for(sibling, facts, answers=edited_answers(model)) == [("Reidreir was born in", "park")]
    revert(model, res.patch.id)
    assert edited_answers(load(path)) == {} and edited_rows(load(path)) == {}


@pytest.mark.parametrize("layers", [[0, 2], [1, 2]])
def test_training_forward_from_the_fixed_prefix_is_the_full_forward(layers):
    """An edit's training runs each step from the first memory layer's value read, with that layer's lookup
    computed once: the same logits and the same gradients on the trained rows as a full forward, bit for bit."""
    from memedit.tracing.capture import fixed_prefix, trainable_rows

    from .conftest import tiny_model

    model = tiny_model(layers=layers)
    tokens = torch.tensor([model.encode(t) for t in ["the cat sat on the mat .", "a dog ran in the park ."]])
    rows = {"shared": torch.arange(0, 256, 3)}
    grads = []
    for prefix in (False, True):
        with contextlib.ExitStack() as stack:
            logits = stack.enter_context(fixed_prefix(model, tokens)) if prefix else (lambda: model(tokens))
            leaves = stack.enter_context(trainable_rows(model, rows))
            with torch.enable_grad():
                out = logits()
                out.float().logsumexp(-1).sum().backward()
            grads.append((out.detach(), leaves["shared"].grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0  # the rows are read: the comparison is not of zeros
