"""Rewrite one fact of the demo model, look at it before and after, then revert the edit exactly.

    python examples/rewrite_fact.py [FACT_ID]

Runs the commands a user would type (shown as it goes) on a private copy of the bundled demo model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def memedit(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "memedit_cli", *args]
    print("$ memedit " + " ".join(args), flush=True)
    r = subprocess.run(cmd, capture_output=capture, text=True)
    if r.returncode != 0:
        sys.exit(f"memedit {args[0]} failed ({r.returncode}): {r.stderr if capture else ''}")
    return r.stdout if capture else ""


def has_command(name: str) -> bool:
    r = subprocess.run([sys.executable, "-m", "memedit_cli", name, "--help"], capture_output=True, text=True)
    return r.returncode == 0


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    fact_id = sys.argv[1] if len(sys.argv) > 1 else "f00012"
    work = Path(tempfile.mkdtemp(prefix="memedit-example."))
    try:
        model = work / "my-model"
        memedit("convert", str(model))
        weights = model / "model.safetensors"
        before = sha(weights)

        world = work / "world"
        memedit("facts", "--out", str(world), "-m", str(model))
        fact = next(json.loads(line) for line in (world / "facts.jsonl").read_text().splitlines()
                    if json.loads(line)["id"] == fact_id)
        prompt = fact["prompt"].format(fact["subject"])
        print(f"\nfact {fact_id}: {prompt!r} -> {fact['target_true']!r}; we rewrite it to {fact['target_new']!r}\n")

        look = ["inspect", prompt, "-m", str(model)] if has_command("inspect") else ["generate", prompt, "-n", "6",
                                                                                      "-m", str(model)]
        memedit(*look)
        memedit("background", "-m", str(model))  # once per model: the statistics TF-IDF ranks against
        memedit("edit", "--fact", fact_id, "-m", str(model))
        memedit(*look)
        memedit("generate", fact["heldout_paraphrases"][0], "-n", "6", "-m", str(model))  # a wording never trained
        memedit("patch", "log", "-m", str(model))

        log = json.loads(memedit("patch", "log", "-m", str(model), "--json", capture=True))
        memedit("patch", "revert", log["applied"][-1], "-m", str(model))
        memedit(*look)
        after = sha(weights)
        print(f"\nmodel.safetensors sha256 before the edit {before}, after the revert {after}: "
              f"{'identical' if before == after else 'DIFFERENT'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
