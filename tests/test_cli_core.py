"""The first commands as a user runs them: info, generate, facts, convert; one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

from memedit.storage.checkpoint import load


def test_info_json_on_the_bundled_model(cli):
    code, out, _ = cli("info", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["n_slots"] >= 16384 and d["heads"] >= 4 and d["knn"] >= 16
    assert d["memory_layers"] and d["tables"][0]["layers"] == d["memory_layers"]
    assert d["read_only"] is True


def test_info_table_on_a_folder(cli, tiny):
    _, path = tiny
    code, out, _ = cli("info", "--model", path)
    assert code == 0
    assert "value tables" in out and "shared" in out


def test_generate_answers_a_fact(cli, demo):
    from memedit.world.facts import world_of

    fact = world_of(demo).facts[0]
    code, out, _ = cli("generate", fact.prompt.format(fact.subject), "--json", "-n", "8")
    assert code == 0
    assert json.loads(out)["completion"].lstrip().startswith(fact.target_true)  # several BPE tokens


def test_facts_writes_jsonl_and_corpus(cli, tmp_path):
    code, _, _ = cli("facts", "--out", tmp_path / "w")
    assert code == 0
    lines = (tmp_path / "w" / "facts.jsonl").read_text().splitlines()
    assert len(lines) >= 1800
    rec = json.loads(lines[0])
    assert {"prompt", "subject", "target_true", "paraphrases", "heldout_paraphrases", "neighborhood"} <= rec.keys()
    assert "{}" in rec["prompt"] and len(rec["paraphrases"]) >= 3 and len(rec["heldout_paraphrases"]) >= 2
    assert len(rec["unseen_paraphrases"]) >= 2
    assert (tmp_path / "w" / "corpus.txt").stat().st_size > 400_000


def test_convert_bundled_to_folder_loads_identically(cli, demo, tmp_path):
    import torch

    code, _, _ = cli("convert", tmp_path / "mine")
    assert code == 0
    mine = load(tmp_path / "mine")
    assert not mine.read_only
    tokens = torch.tensor([demo.encode("Reidreir was born in")])
    assert torch.equal(mine(tokens), demo(tokens))
    # the demo ships its background statistics (`memedit background`: its whole default corpus), and the copy keeps
    from memedit.editing.background import IN_MEMORY_BATCHES, stored

    shipped, copied = stored(demo), stored(mine)
    assert shipped is not None and shipped.n_batches > IN_MEMORY_BATCHES
    assert copied is not None and torch.equal(copied.df["shared"], shipped.df["shared"])


def test_user_errors_are_one_line_with_exit_2(cli, tmp_path):
    code, _, err = cli("info", "--model", tmp_path / "missing")
    assert code == 2
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("generate", "", "--json")
    assert code == 2 and "no tokens" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"format": "memedit", "model": {"dim": "x"}}')
    code, _, err = cli("info", "--model", bad)
    assert code == 2 and "Traceback" not in err


def test_help_runs_without_importing_torch():
    code = "import sys, memedit_cli.app as a; sys.argv=['memedit','--help']\n" \
           "try:\n    a.main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "inspect" in r.stdout or "info" in r.stdout


def test_every_command_that_runs_the_model_takes_device(cli, tiny):
    import torch

    _, path = tiny
    commands = [["generate"], ["inspect"], ["trace-causal"], ["audit", "run"], ["export"], ["background"], ["edit"],
                ["keys", "adapt"], ["keys", "route"], ["verify"], ["report"]]
    for c in commands:
        code, out, _ = cli(*c, "--help")
        assert code == 0 and "--device" in out, c
    code, out, _ = cli("generate", "the cat", "-n", 2, "--model", path, "--device", "cpu")
    assert code == 0 and out.strip()
    code, _, err = cli("generate", "the cat", "--model", path, "--device", "tpu")
    assert code == 2 and "tpu" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        code, _, err = cli("verify", "--random", 10, "--model", path, "--device", "cuda")
        assert code == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
