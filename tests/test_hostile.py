"""Hostile and mistaken input, tried as a new user would on a copy of the demo model: every command line below is
refused with one line and exit code 2, no traceback, the model folder byte-identical (its lock file aside), and
in under 10 s. The store's own bad-input cases are in tests/test_store.py; these are the ones of the hostile-input
trial (integers past int64, values past the table's dtype, bytes that are not UTF-8, wrong JSON shapes, runaway
sizes, output paths that fail only after a change, usage errors)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from memedit.errors import MemeditError

BAD = "Reid\udcffreir"  # how Python hands over an argument holding the byte 0xff (not UTF-8): a lone surrogate
REQUEST = {"prompt": "{} was born in", "subject": "Theibris", "target_new": "Baiter"}
BIG = 10**20  # past int64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(model folder, folder of hostile files): a `memedit convert` copy of the demo, and the files the cases read."""
    from memedit_cli.app import app
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("hostile")
    model = root / "M"
    r = CliRunner().invoke(app, ["convert", str(model)])
    assert r.exit_code == 0, r.output
    f = root / "files"
    f.mkdir()
    np.save(f / "zero_d.npy", np.array(1.0))
    np.save(f / "three_d.npy", np.ones((1, 1, 128), dtype=np.float32))
    np.save(f / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(f / "complex.npy", np.ones((1, 128), dtype=np.complex64))
    np.save(f / "bigint.npy", np.full((1, 128), 10**12, dtype=np.int64))
    np.save(f / "u64.npy", np.full((1, 128), 5, dtype=np.uint64))
    np.save(f / "f64_huge.npy", np.full((1, 128), 1e300))
    np.save(f / "nan.npy", np.full((1, 128), np.nan, dtype=np.float32))
    np.save(f / "int64max.npy", np.array([2**63 - 1]))
    (f / "bigid.txt").write_text(f"{BIG}\n")
    (f / "bad_utf8.txt").write_bytes(b"Reid\xffreir was born in\n")
    (f / "bigline.txt").write_text("the cat " * 700_000 + "\n")  # one 5.6 MB line
    lines = {
        # a JSON array of requests is read (issue 23); one of wrong records is not
        "array.jsonl": json.dumps([REQUEST, 5]),
        "array_lines.jsonl": "[\n" + json.dumps(REQUEST) + ",\n" + json.dumps({"prompts": 5}) + "\n]",
        "number.jsonl": "42",
        "null.jsonl": "null",
        "target_number.jsonl": json.dumps(REQUEST | {"target_new": 5}),
        "prompt_null.jsonl": json.dumps(REQUEST | {"prompt": None}),
        "paraphrases_string.jsonl": json.dumps(REQUEST | {"paraphrases": "The birthplace"}),
        "neighborhood_numbers.jsonl": json.dumps(REQUEST | {"neighborhood": [1, 2]}),
        "keep_string.jsonl": json.dumps(REQUEST | {"keep": "x"}),
        "second_bad.jsonl": json.dumps(REQUEST) + "\n" + json.dumps(REQUEST | {"subject": 7}),
        "empty_subject.jsonl": json.dumps(REQUEST | {"subject": ""}),
    }
    for name, text in lines.items():
        (f / name).write_text(text + "\n")
    (f / "bad_utf8.jsonl").write_bytes(b'{"prompt": "{} was born in", "subject": "Reid\xffreir", "target_new": "B"}\n')
    (f / "facts_bad_utf8.jsonl").write_bytes(b'{"id": "x", "prompt": "{} was born in", "subject": "Reid\xffreir", '
                                             b'"target_true": "Sotim"}\n')
    return model, f


def folder_state(path: Path) -> dict[str, str]:
    """Every file of a model folder (its lock file aside: lock bookkeeping) with a hash of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*")) if p.name != "lock"}


# (id, command line): M is the model folder, F/ a file of the `world` fixture
CASES = [
    # integers past int64
    ("row-past-int64", ["patch", "set", "-t", "shared", "-r", str(BIG), "--scalar", "1", "--apply"]),
    ("row-2^63", ["patch", "set", "-t", "shared", "-r", "9223372036854775808", "--scalar", "1", "--apply"]),
    ("range-past-int64", ["patch", "zero", "-t", "shared", "-r", f"1-{BIG}", "--apply"]),
    ("copy-from-row-past-int64", ["patch", "copy", "-t", "shared", "-r", "5", "--from-row", str(BIG), "--apply"]),
    ("freeze-row-past-int64", ["freeze", "-r", str(BIG)]),
    ("unfreeze-row-past-int64", ["unfreeze", "-r", str(BIG)]),
    ("freeze-file-row-past-int64", ["freeze", "--file", "F/bigid.txt"]),
    ("freeze-file-npy-int64-max", ["freeze", "--file", "F/int64max.npy"]),
    ("generate-n-past-int64", ["generate", "hello", "-n", str(BIG)]),
    # values past the table's dtype, and files of the wrong shape or kind
    ("scalar-past-bf16", ["patch", "set", "-t", "shared", "-r", "5", "--scalar", "1e39", "--apply"]),
    ("scalar-add-past-bf16", ["patch", "add", "-t", "shared", "-r", "5", "--scalar", "-1e39", "--apply"]),
    ("edit-lr-1e39", ["edit", "--fact", "f00012", "--lr", "1e39"]),
    ("values-0d", ["patch", "set", "-t", "shared", "-r", "5", "--values", "F/zero_d.npy", "--apply"]),
    ("values-3d", ["patch", "set", "-t", "shared", "-r", "5", "--values", "F/three_d.npy", "--apply"]),
    ("values-pickled", ["patch", "set", "-t", "shared", "-r", "5", "--values", "F/pickled.npy", "--apply"]),
    ("values-complex", ["patch", "set", "-t", "shared", "-r", "5", "--values", "F/complex.npy", "--apply"]),
    ("values-int-past-float32", ["patch", "set", "-t", "shared", "-r", "5", "--values", "F/bigint.npy", "--apply"]),
    ("values-uint64", ["patch", "set", "-t", "shared", "-r", "5", "--values", "F/u64.npy", "--apply"]),
    ("values-float64-past-float32", ["patch", "add", "-t", "shared", "-r", "5", "--values", "F/f64_huge.npy",
                                     "--apply"]),
    ("values-nan", ["patch", "set", "-t", "shared", "-r", "5", "--values", "F/nan.npy", "--apply"]),
    ("freeze-file-pickled", ["freeze", "--file", "F/pickled.npy"]),
    # bytes that are not UTF-8
    ("generate-not-utf8", ["generate", BAD]),
    ("inspect-not-utf8", ["inspect", BAD]),
    ("edit-prompt-not-utf8", ["edit", "--prompt", BAD + " {} was born in", "--subject", "Theibris",
                              "--target-new", "Baiter"]),
    ("edit-subject-not-utf8", ["edit", "--prompt", "{} was born in", "--subject", BAD, "--target-new", "Baiter"]),
    ("message-not-utf8", ["patch", "set", "-t", "shared", "-r", "5", "--scalar", "1", "--message", BAD, "--apply"]),
    ("trace-causal-subject-not-utf8", ["trace-causal", "Reidreir was born in", "--subject", BAD, "--target", "x"]),
    ("requests-not-utf8", ["edit", "--requests", "F/bad_utf8.jsonl"]),
    ("facts-not-utf8", ["edit", "--fact", "x", "--facts", "F/facts_bad_utf8.jsonl"]),
    ("freeze-file-not-utf8", ["freeze", "--file", "F/bad_utf8.txt"]),
    ("keys-adapt-corpus-not-utf8", ["keys", "adapt", "F/bad_utf8.txt"]),
    # --requests records of the wrong shape: the line and the field are named
    *[(f"requests-{name}", ["edit", "--requests", f"F/{name}.jsonl"])
      for name in ("array", "array_lines", "number", "null", "target_number", "prompt_null", "paraphrases_string",
                   "neighborhood_numbers", "keep_string", "second_bad", "empty_subject")],
    # runaway sizes: refused up front, naming the cap
    ("trace-causal-samples", ["trace-causal", "Reidreir was born in", "--subject", "Reidreir", "--target", "x",
                              "--samples", "1000000000"]),
    ("verify-limit", ["verify", "--limit", str(BIG)]),
    ("verify-random", ["verify", "--random", "1000000000"]),
    ("verify-threads", ["verify", "--threads", "100000"]),
    ("generate-n", ["generate", "hello", "-n", "1000000000"]),
    ("generate-n-past-context", ["generate", "hello", "-n", "5000"]),
    ("audit-contexts-memory", ["audit", "--contexts", "1024"]),
    ("export-top-tokens", ["export", "--out", "x.h5", "--top-tokens", "1000000000"]),
    ("export-top-tokens-past-vocab", ["export", "--out", "x.h5", "--top-tokens", "999"]),
    ("background-batch-size", ["background", "--batch-size", str(BIG)]),
    ("background-max-batches", ["background", "--max-batches", str(BIG)]),
    ("audit-batch-size", ["audit", "--batch-size", str(BIG)]),
    ("audit-tokens-past-int64", ["audit", "--tokens", str(BIG)]),
    ("train-epochs", ["train", "--out", "new", "--epochs", str(BIG)]),
    ("train-seed-past-int64", ["train", "--out", "new", "--seed", str(BIG)]),
    ("verify-seed-past-int64", ["verify", "--random", "10", "--seed", str(BIG)]),
    ("trace-causal-seed-past-int64", ["trace-causal", "Reidreir was born in", "--subject", "Reidreir", "--target",
                                      "x", "--seed", str(BIG)]),
    ("freeze-hot-past-rows", ["freeze", "--hot", str(BIG)]),
    ("edit-optimizer-unknown", ["edit", "--fact", "f00012", "--optimizer", "nope"]),
    ("keys-adapt-steps", ["keys", "adapt", "F/bad_utf8.txt", "--steps", "1000000000"]),
    ("keys-adapt-5mb-line", ["keys", "adapt", "F/bigline.txt"]),
    ("audit-5mb-line", ["audit", "F/bigline.txt"]),
    ("inspect-5mb-prompt", ["inspect", "the cat " * 700_000]),
    ("edit-2mb-prompt", ["edit", "--prompt", "{} was born in " + "x" * 2_000_000, "--subject", "Theibris",
                         "--target-new", "Baiter"]),
    ("requests-dev-zero", ["edit", "--requests", "/dev/zero"]),
    ("requests-dev-urandom", ["edit", "--requests", "/dev/urandom"]),
    ("requests-folder", ["edit", "--requests", "F"]),
    # values that cannot be meant
    ("edit-lr-negative", ["edit", "--fact", "f00012", "--lr", "-1"]),
    ("edit-lr-zero", ["edit", "--fact", "f00012", "--lr", "0"]),
    ("edit-lr-nan", ["edit", "--fact", "f00012", "--lr", "nan"]),
    ("edit-device-cpu-99", ["edit", "--fact", "f00012", "--device", "cpu:99"]),
    ("edit-empty-subject", ["edit", "--prompt", "{} was born in", "--subject", "", "--target-new", "Baiter"]),
    ("keys-route-no-placeholder", ["keys", "route", "--prompt", "keeps a pet", "--subject", "Theibris", "--target",
                                   "in"]),
    ("keys-route-empty-subject", ["keys", "route", "--prompt", "{} keeps a pet", "--subject", "", "--target", "in"]),
    ("keys-route-margin-nan", ["keys", "route", "--prompt", "{} keeps a pet", "--subject", "Theibris", "--target",
                               "in", "--margin", "nan"]),
    ("keys-adapt-lr-nan", ["keys", "adapt", "F/bad_utf8.txt", "--lr", "nan"]),
    ("trace-causal-noise-nan", ["trace-causal", "Reidreir was born in", "--subject", "Reidreir", "--target", "x",
                                "--noise", "nan"]),
    ("trace-causal-noise-negative", ["trace-causal", "Reidreir was born in", "--subject", "Reidreir", "--target", "x",
                                     "--noise", "-1"]),
    # outputs checked before any change or any work
    ("edit-out-proc", ["edit", "--fact", "f00012", "--out", "/proc/version"]),
    ("patch-out-proc", ["patch", "set", "-t", "shared", "-r", "5", "--scalar", "1", "--out", "/proc/version",
                        "--apply"]),
    ("train-out-proc", ["train", "--out", "/proc/x"]),
    ("convert-into-state-folder", ["convert", "M/memedit/sub"]),
    ("convert-into-model-folder", ["convert", "M/sub"]),
    # usage errors: one line, not click's box
    ("scalar-abc", ["patch", "set", "-t", "shared", "-r", "5", "--scalar", "abc"]),
    ("steps-0", ["edit", "--fact", "f00012", "--steps", "0"]),
    ("top-t-0", ["edit", "--fact", "f00012", "--top-t", "0"]),
    ("contrast-negative", ["edit", "--fact", "f00012", "--contrast", "-1"]),
    ("generate-n-0", ["generate", "hello", "-n", "0"]),
    ("verify-threads-0", ["verify", "--threads", "0"]),
    ("audit-contexts-2000", ["audit", "--contexts", "2000"]),
    ("slot-negative", ["slot", "--", "-1"]),
    ("slot-abc", ["slot", "abc"]),
    ("missing-option", ["patch", "set", "-t", "shared"]),
    ("unknown-command", ["nosuchcommand"]),
    ("unknown-option", ["generate", "hello", "--nosuch"]),
]
NO_MODEL = {"unknown-command", "train-out-proc", "train-epochs", "train-seed-past-int64"}  # commands that take no --model


@pytest.mark.parametrize("args", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(cli, world, tmp_path, monkeypatch, request, args):
    model, files = world
    monkeypatch.chdir(tmp_path)  # a command that wrongly went ahead would write its patch file here, not in tests/
    args = [str(files) + a[1:] if a.startswith("F/") or a == "F" else str(model) + a[1:] if a.startswith("M/") else a
            for a in args]
    if request.node.callspec.id not in NO_MODEL:
        args += ["-m", str(model)]
    before = folder_state(model)
    t0 = time.perf_counter()
    code, out, err = cli(*args)  # a traceback raises here (the cli fixture re-raises)
    seconds = time.perf_counter() - t0
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err)
    assert "Traceback" not in err + out
    assert folder_state(model) == before
    assert not list(tmp_path.iterdir())  # nothing written where the command ran
    assert seconds < 10, f"{seconds:.1f} s before refusing"


def test_the_refusals_say_what_was_wrong(cli, world):
    """A few of the messages, read as a user reads them: the line and field of a request, the cap and its flag."""
    model, files = world
    m = ["-m", str(model)]
    err = cli("edit", "--requests", files / "second_bad.jsonl", *m)[2]
    assert "second_bad.jsonl:2:" in err and "'subject'" in err
    err = cli("edit", "--requests", files / "paraphrases_string.jsonl", *m)[2]
    assert "'paraphrases' must be a list of strings" in err
    assert "--samples" in cli("trace-causal", "a b", "-s", "a", "-t", "b", "--samples", "1000000000", *m)[2]
    assert "give --contexts 282 or fewer" in " ".join(cli("audit", "--contexts", "1024", *m)[2].split())
    assert "not valid UTF-8" in cli("generate", BAD, *m)[2]
    assert "/proc" in cli("train", "--out", "/proc/x")[2]


def test_a_refused_no_wait_writer_touches_only_the_lock_file(cli, world, monkeypatch):
    """`memedit --no-wait patch set` against a held lock: exit 2, and nothing but memedit/lock changes (its holder
    text: lock bookkeeping)."""
    model, _ = world
    monkeypatch.setenv("MEMEDIT_NO_WAIT", "0")  # --no-wait sets it in this process: put it back afterwards
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom memedit.storage.store import Store\n"
         "with Store(sys.argv[1]).locked():\n    print('held', flush=True)\n    time.sleep(60)", str(model)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = folder_state(model)
        code, _, err = cli("--no-wait", "patch", "set", "-m", model, "-t", "shared", "-r", "5", "--scalar", "1",
                           "--apply")
        assert code == 2 and "is being changed by" in err and len(err.strip().splitlines()) == 1
        assert folder_state(model) == before
    finally:
        holder.kill()
        holder.wait()


# ---- the library refuses what a Python caller can pass, too -------------------------------------------------------
def test_library_functions_validate_their_arguments(demo):
    from memedit import limits
    from memedit.editing.patch import check_rows, parse_rows, row_patch
    from memedit.editing.sparse_ft import EditConfig, EditRequest
    from memedit.keyspace.exact import random_source
    from memedit.lm.generate import generate
    from memedit.tracing.causal import causal_trace

    refused = [
        lambda: parse_rows(f"{BIG}"),
        lambda: check_rows(demo, "shared", [BIG]),
        lambda: row_patch(demo, "set", "shared", [5], scalar=1e39),
        lambda: row_patch(demo, "set", "shared", [5], scalar=1.0, message=BAD),
        lambda: generate(demo, "hello", BIG),
        lambda: generate(demo, BAD),
        lambda: causal_trace(demo, "Reidreir was born in", "Reidreir", "x", samples=10**9),
        lambda: causal_trace(demo, "Reidreir was born in", "Reidreir", "x", noise=float("nan")),
        lambda: random_source(10**9),
        lambda: EditRequest.from_dict([REQUEST]),
        lambda: EditRequest.from_dict(REQUEST | {"paraphrases": "The birthplace"}),
        lambda: EditRequest(prompt=None, subject="a", target_new="b"),
        lambda: EditRequest(prompt="{} was born in", subject="", target_new="b"),
        lambda: EditConfig(lr=-1.0).check(),
        lambda: limits.text("x" * (limits.MAX_TEXT_CHARS + 1), "a prompt"),
    ]
    for call in refused:
        with pytest.raises(MemeditError):
            call()
    assert demo.table("shared").weight.dtype == torch.bfloat16  # the scalar case above met a bf16 table
