"""The editing field's formats (issue 23): CounterFact, ZsRE and EasyEdit requests in; their metrics and ROME's
result files out. On the BPE fixture (tests/bpe_world.py: 300 facts, 4,096 slots); each CLI edit takes seconds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from memedit.editing.formats import read_cases
from memedit.editing.formats import read_requests
from memedit.editing.sparse_ft import EditRequest
from memedit.errors import MemeditError

from .bpe_world import FIXTURE

# one CounterFact record in the dataset's exact shape (counterfact.json: a pretty-printed array), about a fact of
# the fixture's world (f00003: Koutein plays the drums)
CF = {
    "case_id": 3,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "{} owns a well-worn",
        "relation_id": "P1303",
        "target_new": {"str": "harp", "id": "Q47369"},
        "target_true": {"str": "drums", "id": "Q11404"},
        "subject": "Koutein",
    },
    "paraphrase_prompts": ["Koutein practices the", "Koutein learned to play the"],
    "neighborhood_prompts": ["Diabrafork owns a well-worn", "The instrument of Poumen is the", "Pumax practices the"],
    "attribute_prompts": ["Diabrafork owns a well-worn"],
    "generation_prompts": ["Koutein is known for"],
}
# ZsRE as MEND / EasyEdit ship it (zsre_mend_eval.json)
ZSRE = {"subject": "Koutein", "src": "Koutein owns a well-worn", "pred": "drums", "rephrase": "Koutein practices the",
        "alt": "harp", "answers": ["drums"], "loc": "nq question: The instrument of Poumen is the", "loc_ans": "drums",
        "cond": "drums >> harp || Koutein owns a well-worn"}
# EasyEdit's BaseEditor.edit(...) arguments as JSON: two edits
EASY = {
    "prompts": ["Koutein owns a well-worn", "The instrument of Pumax is the"],
    "ground_truth": ["drums", "drums"],
    "target_new": ["harp", "cello"],
    "subject": ["Koutein", "Pumax"],
    "rephrase_prompts": ["Koutein practices the", "Pumax practices the"],
    "locality_inputs": {"neighborhood": {"prompt": ["The instrument of Poumen is the", "Diabrafork owns a well-worn"],
                                         "ground_truth": ["drums", "drums"]}},
}


def folder_state(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*")) if p.name != "lock"}


@pytest.fixture(scope="module")
def bpe_bg(tmp_path_factory):
    """A copy of the BPE fixture with `memedit background` (its world's text)."""
    from memedit_cli.app import app
    from typer.testing import CliRunner

    path = tmp_path_factory.mktemp("formats") / "bpe"
    shutil.copytree(FIXTURE, path)
    r = CliRunner().invoke(app, ["background", "-m", str(path), "--json"])
    assert r.exit_code == 0, r.output
    return path


@pytest.fixture
def folder(bpe_bg, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(bpe_bg, path)
    return path


# ---- reading ---------------------------------------------------------------------------------------------
def test_a_counterfact_record_reads_pretty_printed_on_one_line_and_as_jsonl(tmp_path):
    for name, text in (("pretty.json", json.dumps([CF], indent=2)), ("line.json", json.dumps([CF])),
                       ("obj.json", json.dumps(CF, indent=4)), ("cf.jsonl", json.dumps(CF) + "\n")):
        (tmp_path / name).write_text(text)
        (c,) = read_cases(tmp_path / name)
        r = c.request
        assert (c.format, c.case_id, c.subject_in_prompt) == ("counterfact", "3", True)
        assert (r.prompt, r.subject, r.target_new, r.target_true) == ("{} owns a well-worn", "Koutein", "harp",
                                                                      "drums")
        assert r.paraphrases == [] and r.heldout_paraphrases == CF["paraphrase_prompts"]  # measured, not trained
        assert r.neighborhood == CF["neighborhood_prompts"] and c.locality == []
        assert c.requested_rewrite == CF["requested_rewrite"]
        assert c.extra["generation_prompts"] == ["Koutein is known for"]


def test_zsre_follows_easyedit_mapping_and_a_missing_subject_is_counted_not_refused(tmp_path):
    away = ZSRE | {"subject": "Nobody", "src": "What does Koutein own?"}
    (tmp_path / "z.json").write_text(json.dumps([ZSRE, away], indent=1))
    a, b = read_cases(tmp_path / "z.json")
    r = a.request
    assert (a.format, r.prompt, r.subject, r.target_new, r.target_true) == ("zsre", "{} owns a well-worn", "Koutein",
                                                                           "harp", "drums")
    assert r.rewrite_prompt == ZSRE["src"] and r.heldout_paraphrases == [ZSRE["rephrase"]]
    assert a.locality == [(ZSRE["loc"], "drums")] and a.subject_in_prompt
    assert b.request.prompt == "What does Koutein own?" and not b.subject_in_prompt


def test_easyedit_call_fields_give_one_case_per_prompt(tmp_path):
    (tmp_path / "e.json").write_text(json.dumps(EASY, indent=2))
    a, b = read_cases(tmp_path / "e.json")
    assert [c.format for c in (a, b)] == ["easyedit", "easyedit"]
    assert (a.request.prompt, a.request.target_new, a.request.target_true) == ("{} owns a well-worn", "harp", "drums")
    assert (b.request.prompt, b.request.target_new) == ("The instrument of {} is the", "cello")
    assert a.request.heldout_paraphrases == ["Koutein practices the"]
    assert b.locality == [("Diabrafork owns a well-worn", "drums")]
    # one edit as plain strings, no ground truth (EasyEdit's "<|endoftext|>": here the model's own answer)
    one = {"prompts": "Koutein owns a well-worn", "target_new": "harp", "ground_truth": "<|endoftext|>"}
    (tmp_path / "one.json").write_text(json.dumps(one))
    (c,) = read_cases(tmp_path / "one.json")
    assert c.request.target_true == "" and not c.subject_in_prompt


def test_easyedits_own_data_records_are_told_from_memedits(tmp_path):
    """EasyEdit's counterfact-edit.json records (its CounterFactDataset's fields): not memedit records, though they
    have a 'prompt' and a 'target_new'."""
    rec = {"case_id": 11, "prompt": "Koutein owns a well-worn", "target_new": "harp", "subject": "Koutein",
           "ground_truth": "drums", "rephrase_prompt": "Koutein practices the",
           "locality_prompt": "Pumax practices the", "locality_ground_truth": "drums"}
    (tmp_path / "e.json").write_text(json.dumps([rec, rec | {"case_id": 12, "ground_truth": ["drums", "drum"]}]))
    a, b = read_cases(tmp_path / "e.json")
    assert (a.format, a.case_id, a.request.prompt, a.request.target_true) == ("easyedit", "11", "{} owns a well-worn",
                                                                             "drums")
    assert a.request.heldout_paraphrases == ["Koutein practices the"] and a.locality == [("Pumax practices the",
                                                                                          "drums")]
    assert b.request.target_true == "drums" and b.case_id == "12"
    bad = {k: v for k, v in rec.items() if k != "locality_ground_truth"}
    (tmp_path / "bad.json").write_text(json.dumps([bad]))
    with pytest.raises(MemeditError, match="record 1 .case_id 11.: .*'locality_ground_truth'"):
        read_cases(tmp_path / "bad.json")


def test_memedit_jsonl_is_read_as_before(tmp_path):
    mine = {"id": "r1", "prompt": "{} owns a well-worn", "subject": "Koutein", "target_new": "harp",
            "paraphrases": ["Koutein practices the"], "keep": [["Koutein was born in", "Sotim"]]}
    (tmp_path / "r.jsonl").write_text(json.dumps(mine) + "\n\n" + json.dumps(mine | {"id": "r2"}) + "\n")
    reqs = read_requests(tmp_path / "r.jsonl")
    assert reqs == [EditRequest.from_dict(mine), EditRequest.from_dict(mine | {"id": "r2"})]
    assert [c.format for c in read_cases(tmp_path / "r.jsonl")] == ["memedit", "memedit"]


# ---- editing through the CLI -----------------------------------------------------------------------------
def test_the_counterfact_record_edits_through_the_cli(cli, folder, tmp_path):
    (tmp_path / "cf.json").write_text(json.dumps([CF], indent=2))
    code, out, err = cli("edit", "-m", folder, "--requests", tmp_path / "cf.json", "--json")
    assert code == 0, err
    res = json.loads(out)
    (e,) = res["edits"]
    assert e["status"] == "committed" and e["format"] == "counterfact" and e["case_id"] == "3"
    assert e["efficacy"] == 1.0 and e["counterfact"]["rewrite_success"] == 1.0
    s = res["summary"]
    assert s["formats"] == ["counterfact"] and s["subject_not_in_prompt"] == 0
    assert s["counterfact"]["pre"]["rewrite_success"] == 0.0 and s["counterfact"]["post"]["rewrite_success"] == 1.0


def test_zsre_and_easyedit_files_edit_through_the_cli_and_count_missing_subjects(cli, folder, tmp_path):
    away = ZSRE | {"subject": "Nobody", "src": "The instrument of Pumax is the", "alt": "cello",
                   "rephrase": "Pumax practices the"}
    (tmp_path / "z.jsonl").write_text(json.dumps(ZSRE) + "\n" + json.dumps(away) + "\n")
    code, out, err = cli("edit", "-m", folder, "--requests", tmp_path / "z.jsonl", "--sequential", "--dry-run",
                         "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [e["format"] for e in res["edits"]] == ["zsre", "zsre"]
    assert res["summary"]["subject_not_in_prompt"] == 1 and res["summary"]["easyedit"]["post"]["loc"] is not None
    code, out, err = cli("edit", "-m", folder, "--requests", tmp_path / "z.jsonl", "--sequential", "--dry-run")
    assert code == 0 and "1 request(s) name a subject their prompt does not hold" in " ".join(out.split())
    (tmp_path / "e.json").write_text(json.dumps(EASY, indent=2))
    code, out, err = cli("edit", "-m", folder, "--requests", tmp_path / "e.json", "--dry-run", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [e["format"] for e in res["edits"]] == ["easyedit", "easyedit"]
    assert res["summary"]["easyedit"]["post"]["rel"] is not None


MALFORMED = [  # (record, what the one-line error must name)
    ({"case_id": 7, "requested_rewrite": {"prompt": "{} x", "subject": "A", "target_true": {"str": "b"}}},
     "'requested_rewrite.target_new'"),
    (CF | {"requested_rewrite": CF["requested_rewrite"] | {"target_new": "harp"}},
     "'requested_rewrite.target_new' must be an object"),
    (CF | {"requested_rewrite": CF["requested_rewrite"] | {"target_true": {"str": 5}}},
     "'requested_rewrite.target_true.str'"),
    (CF | {"paraphrase_prompts": 5}, "'paraphrase_prompts'"),
    ({k: v for k, v in ZSRE.items() if k != "alt"}, "'alt'"),
    (ZSRE | {"answers": []}, "'answers'"),
    ({k: v for k, v in ZSRE.items() if k != "loc_ans"}, "'loc_ans'"),
    ({k: v for k, v in EASY.items() if k != "target_new"}, "'target_new'"),
    (EASY | {"target_new": ["harp"]}, "'target_new' has 1 entries for 2 prompts"),
    ({"question": "Who?", "answer": "x"}, "lacks 'prompt' (memedit), 'requested_rewrite' (CounterFact)"),
]


@pytest.mark.parametrize("record,names", MALFORMED, ids=[f"bad{i}" for i in range(len(MALFORMED))])
def test_a_malformed_record_is_one_line_naming_record_and_field_exit_2_folder_unchanged(cli, folder, tmp_path,
                                                                                        record, names):
    (tmp_path / "bad.json").write_text(json.dumps([CF, record], indent=2))
    before = folder_state(folder)
    code, out, err = cli("edit", "-m", folder, "--requests", tmp_path / "bad.json")  # a traceback raises here
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err)
    assert "record 2" in err and names in err, err
    assert "Traceback" not in err + out
    assert folder_state(folder) == before


# ---- the demo world written in the field's formats, read back, edited --------------------------------------
@pytest.mark.parametrize("fmt", ["counterfact", "zsre"])
def test_facts_export_round_trips_and_edits_through_the_cli(cli, folder, tmp_path, fmt):
    from memedit.storage.checkpoint import load
    from memedit.world.facts import world_of

    world = world_of(load(folder)).facts
    out = tmp_path / f"{fmt}.json"
    code, text, err = cli("facts", "-m", folder, "--format", fmt, "--out", out)
    assert code == 0, err
    cases = read_cases(out)
    assert len(cases) == len(world) == 300 and {c.format for c in cases} == {fmt}
    for c, f in zip(cases, world, strict=True):
        r = c.request
        assert (r.rewrite_prompt, r.subject, r.target_new, r.target_true) == (
            f.prompt.replace("{}", f.subject), f.subject, f.target_new, f.target_true)
        assert c.subject_in_prompt
        if fmt == "counterfact":
            assert r.prompt == f.prompt and c.case_id == str(world.index(f))
            assert r.heldout_paraphrases == f.heldout_paraphrases and r.neighborhood == f.neighborhood
        else:
            assert r.heldout_paraphrases == f.heldout_paraphrases[:1] and len(c.locality) == 1
            other_prompt, other_answer = c.locality[0]
            assert any(g.subject != f.subject and g.prompt.replace("{}", g.subject) == other_prompt
                       and g.target_true == other_answer for g in world)
    # --facts FILE and --limit: the first facts of a facts JSONL
    assert cli("facts", "-m", folder, "--out", tmp_path / "w")[0] == 0
    assert cli("facts", "--facts", tmp_path / "w" / "facts.jsonl", "--format", fmt, "--limit", "3",
               "--out", tmp_path / "three.json")[0] == 0
    three = json.loads((tmp_path / "three.json").read_text())
    assert len(three) == 3 and [c.request for c in read_cases(tmp_path / "three.json")] == [
        c.request for c in cases[:3]]
    # (--force: one of these edits changes 2.4 % of the fixture's small locality sample, over the guard's 2 %)
    code, text, err = cli("edit", "-m", folder, "--requests", tmp_path / "three.json", "--sequential", "--force",
                          "--json")
    assert code == 0, err
    res = json.loads(text)
    assert {e["status"] for e in res["edits"]} <= {"committed", "forced"} and len(res["edits"]) == 3
    assert res["summary"]["counterfact"]["post"]["rewrite_success"] == 1.0


# ---- the field's metrics, checked against an independent computation from the folders' logits ----------------
def _nll_argmax(model, prompt: str, target: str) -> tuple[list[float], list[int], list[int]]:
    """(per-token NLL, argmax, target tokens) of ``target`` after ``prompt``, one unpadded forward, the target's
    tokens those of encode(prompt + " " + target) past the prompt's (ROME's tok(f" {target}") after the prefix)."""
    import torch

    p = model.encode(prompt)
    whole = model.encode(prompt + " " + target.strip())
    assert whole[: len(p)] == p  # the fixture's prompts and targets join without a merge across the boundary
    ids = whole[len(p):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).float()[0], -1)
    rows = logp[len(p) - 1:]
    return [-float(rows[i, t]) for i, t in enumerate(ids)], rows.argmax(-1).tolist(), ids


def _rome_case(model, rr: dict, para: list[str], neigh: list[str]) -> dict:
    """A case as ROME's compute_rewrite_quality_counterfact writes it (mean NLLs, argmax correctness)."""
    new, old = rr["target_new"]["str"], rr["target_true"]["str"]
    out = {}
    for key, prompts in (("rewrite", [rr["prompt"].replace("{}", rr["subject"])]), ("paraphrase", para),
                         ("neighborhood", neigh)):
        probs, correct = [], []
        for p in prompts:
            a, am, aid = _nll_argmax(model, p, new)
            b, bm, bid = _nll_argmax(model, p, old)
            probs.append({"target_new": sum(a) / len(a), "target_true": sum(b) / len(b)})
            correct.append(am == aid if key != "neighborhood" else bm == bid)
        out[f"{key}_prompts_probs"], out[f"{key}_prompts_correct"] = probs, correct
    return out


def _rome_summarize(cases: list[dict]) -> dict:
    """ROME's summarize.py, from its definitions: per case the mean of the comparisons, then the mean over cases
    (x 100, 2 decimals), and the score as the harmonic mean of the three successes."""
    import numpy as np

    out = {}
    for prefix in ("pre", "post"):
        cur: dict[str, list] = {}
        for data in cases:
            for key in ("rewrite_prompts_probs", "paraphrase_prompts_probs"):
                if data[prefix][key]:
                    cur.setdefault(f"{prefix}_{key.split('_')[0]}_success", []).append(
                        np.mean([x["target_true"] > x["target_new"] for x in data[prefix][key]]))
                    cur.setdefault(f"{prefix}_{key.split('_')[0]}_diff", []).append(
                        np.mean([np.exp(-x["target_new"]) - np.exp(-x["target_true"]) for x in data[prefix][key]]))
            key = "neighborhood_prompts_probs"
            if data[prefix][key]:
                cur.setdefault(f"{prefix}_neighborhood_success", []).append(
                    np.mean([x["target_true"] < x["target_new"] for x in data[prefix][key]]))
                cur.setdefault(f"{prefix}_neighborhood_diff", []).append(
                    np.mean([np.exp(-x["target_true"]) - np.exp(-x["target_new"]) for x in data[prefix][key]]))
            for key in ("rewrite", "paraphrase", "neighborhood"):
                if data[prefix][f"{key}_prompts_correct"]:
                    cur.setdefault(f"{prefix}_{key}_acc", []).append(np.mean(data[prefix][f"{key}_prompts_correct"]))
        summ = {k: round(float(np.mean(v)) * 100, 2) for k, v in cur.items()}
        three = [summ[f"{prefix}_{k}_success"] for k in ("rewrite", "paraphrase", "neighborhood")]
        summ[f"{prefix}_score"] = 0.0 if min(three) <= 0 else len(three) / sum(1 / x for x in three)
        out.update(summ)
    return out


def test_metrics_equal_an_independent_computation_and_rome_summarize_reads_the_results(cli, bpe_bg, folder,
                                                                                       tmp_path):
    import numpy as np

    from memedit.storage.checkpoint import load

    assert cli("facts", "-m", folder, "--format", "counterfact", "--out", tmp_path / "cf.json", "--limit", "12")[0] == 0
    # three of the world's facts as exported, and the hand-written record (its case_id 3 is taken: 1000)
    world = json.loads((tmp_path / "cf.json").read_text())
    records = [r for r in world if r["neighborhood_prompts"]][:3] + [CF | {"case_id": 1000}]
    (tmp_path / "req.json").write_text(json.dumps(records))
    zs = [ZSRE | {"src": "The instrument of Pumax is the", "subject": "Pumax", "alt": "cello",
                  "rephrase": "Pumax practices the"}]
    (tmp_path / "z.json").write_text(json.dumps(zs))
    code, out, err = cli("edit", "-m", folder, "--requests", tmp_path / "req.json", "--sequential", "--force",
                         "--results", tmp_path / "res", "--json")
    assert code == 0, err
    res = json.loads(out)
    pre_model, post_model = load(bpe_bg), load(folder)  # the folder before the run and as the run left it

    # ROME's per-case files: one per case, its layout, the figures of an independent forward of each folder
    files = sorted((tmp_path / "res").glob("case_*.json"))
    assert [f.name for f in files] == sorted(f"case_{r['case_id']}.json" for r in records)
    cases = []
    for r in records:
        data = json.loads((tmp_path / "res" / f"case_{r['case_id']}.json").read_text())
        assert set(data) >= {"case_id", "requested_rewrite", "time", "pre", "post"}
        assert data["case_id"] == r["case_id"] and data["requested_rewrite"] == r["requested_rewrite"]
        for prefix, model in (("pre", pre_model), ("post", post_model)):
            want = _rome_case(model, r["requested_rewrite"], r["paraphrase_prompts"], r["neighborhood_prompts"])
            for key, v in want.items():
                got = data[prefix][key]
                if key.endswith("_correct"):
                    assert got == v, (prefix, key)
                else:
                    # batched (memedit) against one prompt at a time (here): float32 sums in other orders; on an
                    # AMD EPYC an NLL of 11.74 nats differed by 1.6e-3 (rtol 1.4e-4), at the base commit too
                    assert np.allclose([[x["target_new"], x["target_true"]] for x in got],
                                       [[x["target_new"], x["target_true"]] for x in v], rtol=3e-4, atol=1e-4), \
                        (prefix, key)
        cases.append(data)
    rome = _rome_summarize(cases)
    s = res["summary"]["counterfact"]
    for prefix in ("pre", "post"):
        for k in ("rewrite_success", "paraphrase_success", "neighborhood_success", "rewrite_diff", "paraphrase_diff",
                  "neighborhood_diff", "rewrite_acc", "paraphrase_acc", "neighborhood_acc"):
            assert round(s[prefix][k] * 100, 2) == pytest.approx(rome[f"{prefix}_{k}"], abs=0.011), (prefix, k)
        assert s[prefix]["score"] * 100 == pytest.approx(rome[f"{prefix}_score"], abs=0.02)
    print("ROME summarize of memedit's files:", {k: v for k, v in rome.items() if k.startswith("post")})
    # WILD: the library's own greedy generate (stops at EOS), cut at a newline and at the target's length + 4
    from memedit.lm.generate import generate

    def hit(model, prompt, target):
        n = len(model.encode(prompt + " " + target)) - len(model.encode(prompt)) + 4
        text = generate(model, prompt, n)["completion"].split("\n")[0]
        norm = lambda x: " ".join(x.split()).casefold().rstrip(".,;:!?\"')] ")  # noqa: E731
        return norm(text) == norm(target)

    hits = []
    for r, c in zip(records, cases, strict=True):
        rr = r["requested_rewrite"]
        want = [hit(post_model, rr["prompt"].replace("{}", rr["subject"]), rr["target_new"]["str"])]
        assert [x["hit"] for x in c["post"]["wild_rewrite"]] == want
        assert [x["hit"] for x in c["post"]["wild_rephrase"]] == [
            hit(post_model, p, rr["target_new"]["str"]) for p in r["paraphrase_prompts"]]
        hits += want
    assert res["summary"]["wild"]["post"]["rel"] == pytest.approx(np.mean(hits))
    print("WILD rel (post):", np.mean(hits), "teacher-forced rewrite acc:", rome["post_rewrite_acc"])
    # per edit, the same figures beside memedit's own
    for e, c in zip(res["edits"], cases, strict=True):
        assert e["counterfact"]["rewrite_success"] == np.mean(
            [x["target_true"] > x["target_new"] for x in c["post"]["rewrite_prompts_probs"]])

    # EasyEdit: rel / gen token accuracy, loc = post-edit argmax equal to pre-edit argmax on the locality pair
    path2 = tmp_path / "m2"
    shutil.copytree(bpe_bg, path2)
    code, out, err = cli("edit", "-m", path2, "--requests", tmp_path / "z.json", "--force", "--json")
    assert code == 0, err
    ee = json.loads(out)["summary"]["easyedit"]
    post2 = load(path2)
    z = zs[0]
    _, am, ids = _nll_argmax(post2, z["src"], z["alt"])
    assert ee["post"]["rel"] == pytest.approx(np.mean(np.equal(am, ids)))
    _, am, ids = _nll_argmax(post2, z["rephrase"], z["alt"])
    assert ee["post"]["gen"] == pytest.approx(np.mean(np.equal(am, ids)))
    _, pre_am, _ = _nll_argmax(pre_model, z["loc"], z["loc_ans"])
    _, post_am, _ = _nll_argmax(post2, z["loc"], z["loc_ans"])
    assert ee["post"]["loc"] == pytest.approx(np.mean(np.equal(pre_am, post_am)))
    _, am, ids = _nll_argmax(pre_model, z["src"], z["alt"])
    assert ee["pre"]["rel"] == pytest.approx(np.mean(np.equal(am, ids)))


# ---- the Python call in EasyEdit's shape --------------------------------------------------------------------
def test_memedit_edit_mirrors_easyedits_editor_and_commits_through_the_folder(folder, tmp_path):
    import numpy as np

    import memedit
    from memedit.editing.sparse_ft import applied_edits

    m = memedit.load(folder)
    before = folder_state(folder)
    dry = memedit.edit(m, **EASY, sequential_edit=True, dry_run=True, force=True)
    assert folder_state(folder) == before and len(dry["edits"]) == 2
    fresh = memedit.load(folder)
    assert all(bool((a.weight == b.weight).all()) for a, b in zip(m.tables, fresh.tables, strict=True))  # put back

    out = memedit.edit(m, **EASY, sequential_edit=True, force=True, results=tmp_path / "res")
    assert [e["format"] for e in out["edits"]] == ["easyedit", "easyedit"]
    assert all(e["applied"] for e in out["edits"] if e["status"] != "already")
    assert [e["id"] for e in applied_edits(memedit.load(folder))] == [e["patch"] for e in out["edits"]]
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["case_0.json", "case_1.json"]
    # the figures against an independent forward of the folder as the call left it
    post = memedit.load(folder)
    rel = [np.mean(np.equal(*_nll_argmax(post, p, t)[1:])) for p, t in zip(EASY["prompts"], EASY["target_new"],
                                                                              strict=True)]
    assert out["summary"]["easyedit"]["post"]["rel"] == pytest.approx(np.mean(rel))
    assert [e["easyedit"]["rel"] for e in out["edits"]] == pytest.approx(rel)
    with pytest.raises(memedit.MemeditError, match="'target_new' has 1 entries for 2 prompts"):
        memedit.edit(m, prompts=EASY["prompts"], target_new=["harp"])


def test_results_needs_requests_and_a_folder(cli, folder, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "cf.json").write_text(json.dumps([CF]))
    for args, says in ((["--fact", "f00003", "--results", tmp_path / "r"], "pass --requests"),
                       (["--requests", tmp_path / "cf.json", "--results", tmp_path / "file"], "is a file")):
        code, out, err = cli("edit", "-m", folder, *args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_the_exported_world_edits_through_the_python_call(cli, folder, tmp_path):
    from memedit.editing.api import run_cases

    assert cli("facts", "-m", folder, "--format", "zsre", "--limit", "2", "--out", tmp_path / "z.json")[0] == 0
    before = folder_state(folder)
    out = run_cases(folder, read_cases(tmp_path / "z.json"), sequential=True, dry_run=True, force=True)
    assert folder_state(folder) == before
    assert [e["format"] for e in out["edits"]] == ["zsre", "zsre"] and out["summary"]["subject_not_in_prompt"] == 0
    assert out["summary"]["easyedit"]["post"]["rel"] == 1.0 and out["summary"]["easyedit"]["pre"]["rel"] < 1.0
