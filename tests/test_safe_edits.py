"""Safe edits on any model (memedit/editing/locality.py): collateral measured on text, a guard, batches that hold.

The model that matters here is one memedit did not train: tests/foreign_model.py (lingua layout, SentencePiece,
one shared 4,096-slot bf16 table, its own forward), edited as a user with only the model and its text would edit
it, and judged by the fixture's own forward on the `--format lingua` export.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from memedit.editing import background as B
from memedit.editing.locality import Locality
from memedit.editing.patch import make_patch, write_rows
from memedit.editing.sparse_ft import EditConfig, EditRequest, run_edits
from memedit.storage.checkpoint import load
from memedit.tracing.targets import score

from . import foreign_model as fm
from .bpe_world import bpe_model


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A `memedit convert` copy of the foreign fixture with `memedit background corpus.txt` (its training text):
    all a user has. Returns (folder, facts)."""
    from memedit_cli.app import app
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("safe")
    run = CliRunner().invoke
    assert run(app, ["convert", str(root / "native"), "--model", str(fm.FIXTURE)]).exit_code == 0
    r = run(app, ["background", str(fm.FIXTURE / "corpus.txt"), "-m", str(root / "native"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["locality_texts"] > 100
    return root / "native", fm.read_facts(fm.FIXTURE)


def rewrites(facts, n: int, seed: int) -> list[dict]:
    """``n`` random facts, each rewritten to another object of its relation (no paraphrases, no facts file)."""
    rng = random.Random(seed)
    objects: dict[str, set[str]] = {}
    for f in facts:
        objects.setdefault(f["relation"], set()).add(f["target_true"])
    return [{"prompt": f["prompt"], "subject": f["subject"],
             "target_new": rng.choice(sorted(objects[f["relation"]] - {f["target_true"]})),
             "target_true": f["target_true"]} for f in rng.sample(facts, n)]


def folder_bytes(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != "lock"}


def test_ten_sequential_rewrites_of_a_foreign_model_hold_and_keep_other_facts(foreign, cli, tmp_path):
    """Issue 21's acceptance: 10 sequential CLI rewrites without --facts, judged from the lingua export by the
    fixture's own forward."""
    import shutil

    src, facts = foreign
    path = tmp_path / "m"
    shutil.copytree(src, path)
    reqs = rewrites(facts, 10, seed=0)
    edited = {r["subject"] for r in reqs}
    others = random.Random(1).sample([f for f in facts if f["subject"] not in edited], 80)
    other_pairs = [(f["prompt"].replace("{}", f["subject"]), f["target_true"]) for f in others]
    state, params, sp = fm.load_foreign(fm.FIXTURE)
    before = fm.accuracy(state, params, sp, other_pairs)

    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    code, out, err = cli("edit", "-m", path, "--requests", tmp_path / "req.jsonl", "--sequential", "--json")
    res = json.loads(out)
    assert code == 0, (err, [(e["status"], e["reason"]) for e in res["edits"]])
    assert res["summary"]["committed"] == 10 and all(e["collateral"] is not None for e in res["edits"])

    assert cli("convert", tmp_path / "lingua", "--format", "lingua", "--model", path)[0] == 0
    state, params, _ = fm.load_foreign(tmp_path / "lingua")  # the export has no .model: the fixture's tokenizer
    prompts = [r["prompt"].replace("{}", r["subject"]) for r in reqs]
    new = fm.mean_logprobs(state, params, sp, list(zip(prompts, [r["target_new"] for r in reqs], strict=True)))
    old = fm.mean_logprobs(state, params, sp, list(zip(prompts, [r["target_true"] for r in reqs], strict=True)))
    efficacy = sum(a > b for a, b in zip(new, old, strict=True))
    exact = sum(fm.exact_matches(state, params, sp, list(zip(prompts, [r["target_new"] for r in reqs],
                                                                  strict=True))))
    after = fm.accuracy(state, params, sp, other_pairs)
    print(f"efficacy {efficacy}/10, exact {exact}/10, other facts {before:.1%} -> {after:.1%}")
    assert efficacy >= 9 and exact >= 8
    assert after >= 0.95 * before


def test_an_edit_over_the_collateral_budget_is_refused_and_the_folder_unchanged(foreign, cli, tmp_path):
    import shutil

    src, facts = foreign
    path = tmp_path / "m"
    shutil.copytree(src, path)
    before = folder_bytes(path)
    reqs = rewrites(facts, 2, seed=3)
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    code, out, err = cli("edit", "-m", path, "--requests", tmp_path / "req.jsonl", "--sequential",
                         "--max-collateral", "0", "--json")
    res = json.loads(out)
    assert code == 1
    assert [e["status"] for e in res["edits"]] == ["refused", "refused"]  # the second still ran
    assert all("collateral" in e["reason"] and e["collateral"]["changed"] > 0 for e in res["edits"])
    assert res["summary"]["refused"] == 2 and res["summary"]["committed"] == 0
    assert folder_bytes(path) == before
    # --force commits over the guard and says so
    code, out, err = cli("edit", "-m", path, "--requests", tmp_path / "req.jsonl", "--max-collateral", "0",
                         "--force")
    assert code == 0 and "FORCED" in out
    assert folder_bytes(path) != before


def test_a_request_the_model_already_answers_is_skipped_not_an_abort(foreign, cli, tmp_path):
    import shutil

    src, facts = foreign
    path = tmp_path / "m"
    shutil.copytree(src, path)
    same = dict(rewrites(facts, 1, seed=5)[0])
    same["target_new"] = same["target_true"]  # already the model's answer
    reqs = [same] + rewrites(facts, 1, seed=6)
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    code, out, err = cli("edit", "-m", path, "--requests", tmp_path / "req.jsonl", "--sequential", "--json")
    res = json.loads(out)
    assert code == 0, err
    assert [e["status"] for e in res["edits"]] == ["already", "committed"]
    assert res["summary"]["already"] == 1 and res["summary"]["committed"] == 1


def test_collateral_runs_only_sequences_that_read_a_changed_row_and_equals_a_full_comparison(tmp_path):
    """Skipping sequences that read no changed row is exact: the figures equal a comparison of every sequence."""
    model, _, world = bpe_model(tmp_path)
    texts = world.training_sentences()[:120]
    loc = Locality(model, texts)
    table = model.tables[0]
    # 12 of the rows the sample reads least: most sequences read none of them
    seqs_reading = torch.stack([loc.reads({table.name: torch.tensor([r])}).any(1).sum()
                                for r in range(table.n_rows)])  # (rows,)
    rarely = (seqs_reading > 0).nonzero().flatten()
    rows = rarely[seqs_reading[rarely].argsort(stable=True)[:12]].sort().values
    new = torch.randn(len(rows), table.weight.shape[1], generator=torch.Generator().manual_seed(0)) * 100
    patch = make_patch(model, {table.name: (rows, new.to(table.weight.dtype))}, message="test", kind="set")
    def every_sequence():  # one at a time, whole: no skipping, no batching
        return [model(loc.batch_tokens(torch.tensor([i])))[0].float().log_softmax(-1) for i in range(len(loc.texts))]

    full_before = every_sequence()
    write_rows(model, patch, new=True)
    c = loc.collateral({table.name: rows}, held_out=False)
    full_after = every_sequence()
    write_rows(model, patch, new=False)
    changed = sum(int((a.argmax(-1) != b.argmax(-1)).sum()) for a, b in zip(full_before, full_after, strict=True))
    kl = [(a.exp() * (a - b)).sum(-1) for a, b in zip(full_before, full_after, strict=True)]
    positions = int(loc.valid.sum())
    assert c.positions == positions and 0 < c.changed < 0.5
    assert c.changed == pytest.approx(changed / positions)
    assert c.kl_mean == pytest.approx(float(torch.cat(kl).sum()) / positions, rel=1e-3)
    assert c.kl_max == pytest.approx(float(torch.cat(kl).max()), rel=1e-3)
    reads = loc.reads({table.name: rows})
    untouched = (~reads.any(1)).nonzero().flatten().tolist()
    assert untouched  # some sequences read none of the rows: they were not run, and did not change
    assert all(bool((full_before[i] == full_after[i]).all()) for i in untouched)


def test_a_batch_holds_and_keeps_siblings_at_the_answers_the_batch_gives_them(tmp_path):
    """A batch on the BPE world fixture with two facts of one subject: every request holds, per-request losses."""
    model, _, world = bpe_model(tmp_path)
    bg = B.compute(model, world.training_sentences(), 32, 1000, corpus="the fixture world")
    rng = random.Random(2)
    objects = {r.name: r.objects for r in world.relations}
    subject = world.facts[0].subject
    sib = [f for f in world.facts if f.subject == subject][:2]
    picked = sib + rng.sample([f for f in world.facts if f.subject != subject], 8)
    reqs = []
    for f in picked:
        r = EditRequest.from_fact(f)
        r.target_new = rng.choice([o for o in objects[f.relation] if o != f.target_true])
        reqs.append(r)
    loc = Locality(model, bg.locality)
    (res,) = run_edits(model, reqs, bg, EditConfig(), sequential=False, keep_facts=world.facts,
                       subjects=[f.subject for f in world.facts], locality=loc)
    # each sibling is kept at the other's NEW answer, never at its old one
    a, b = reqs[0], reqs[1]
    assert (b.rewrite_prompt, b.target_new) in a.keep and (b.rewrite_prompt, b.target_true) not in a.keep
    assert res.status == "committed" and res.patch is not None and res.done, (res.reason, res.collateral)
    rw = [r.rewrite_prompt for r in reqs]
    new = score(model, rw, [r.target_new for r in reqs])
    old = score(model, rw, [r.target_true for r in reqs])
    held = sum(x.mean_logprob > y.mean_logprob for x, y in zip(new, old, strict=True))
    print(f"batch of 10: {held} hold, {res.steps} steps, collateral {res.collateral.changed:.2%}")
    assert held == 10


def test_a_later_command_keeps_the_answers_of_the_edits_the_folder_holds(foreign, cli, tmp_path):
    """Edits made by an earlier `memedit edit` are kept by later ones (read from the folder's log)."""
    import shutil

    from memedit.editing.sparse_ft import earlier_answers

    src, facts = foreign
    path = tmp_path / "m"
    shutil.copytree(src, path)
    (req,) = rewrites(facts, 1, seed=11)
    (tmp_path / "req.jsonl").write_text(json.dumps(req) + "\n")
    code, out, err = cli("edit", "-m", path, "--requests", tmp_path / "req.jsonl", "--json")
    assert code == 0, err
    kept = earlier_answers(load(path))
    assert [(k.prompt, k.text) for k in kept] == [(req["prompt"].replace("{}", req["subject"]), req["target_new"])]
    code, out, err = cli("patch", "revert", json.loads(out)["edits"][0]["patch"], "-m", path)
    assert code == 0 and earlier_answers(load(path)) == []
