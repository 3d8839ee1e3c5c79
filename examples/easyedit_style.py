"""Rewrite facts with one Python call shaped like EasyEdit's ``editor.edit(...)``, on a private copy of a model.

    python examples/easyedit_style.py [MODEL]     # default: the bundled demo model

Edits the first two facts of the model's demo world to their ``target_new``, committing each edit to the copy's
folder as a patch, and prints memedit's, CounterFact's and EasyEdit's figures.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import memedit
from memedit.editing.background import carry
from memedit.storage.checkpoint import save
from memedit.world.facts import world_of


def main() -> None:
    src = memedit.load(sys.argv[1] if len(sys.argv) > 1 else None)
    folder = Path(tempfile.mkdtemp()) / "model"
    carry(src, save(src, folder))  # a writable copy (the bundled demo's background statistics come along)
    m = memedit.load(folder)
    facts = world_of(m).facts[:2]
    others = world_of(m).facts[-2:]
    out = memedit.edit(
        m,
        prompts=[f.prompt.replace("{}", f.subject) for f in facts],
        target_new=[f.target_new for f in facts],
        ground_truth=[f.target_true for f in facts],
        subject=[f.subject for f in facts],
        rephrase_prompts=[f.heldout_paraphrases[:1] for f in facts],
        locality_inputs={"neighborhood": {"prompt": [o.prompt.replace("{}", o.subject) for o in others],
                                          "ground_truth": [o.target_true for o in others]}},
        sequential_edit=True,
        force=True,  # commit even over the collateral guard (this is a demo)
    )
    for e in out["edits"]:
        print(f"{e['status']:9} patch {e['patch']}  efficacy {e['efficacy']:.0%}  rel {e['easyedit']['rel']:.0%}  "
              f"gen {e['easyedit']['gen']:.0%}  loc {e['easyedit']['loc']:.0%}")
    print(json.dumps({k: out["summary"][k] for k in ("counterfact", "easyedit")}, indent=1))
    print(f"edited copy: {folder} (undo an edit: memedit patch revert ID -m {folder})")


if __name__ == "__main__":
    main()
