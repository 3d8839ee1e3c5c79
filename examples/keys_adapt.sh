#!/usr/bin/env bash
# memedit keys adapt / revert: adapt the sub-keys online to held-out phrasings, then undo it exactly.
set -euo pipefail
MEMEDIT=${MEMEDIT:-memedit}
PY=${PY:-python3}
WORK=${1:-/tmp/memedit-adapt}
rm -rf "$WORK" && mkdir -p "$WORK"

$MEMEDIT convert "$WORK/model"                       # the bundled model is read-only: work on a copy
# held-out phrasings of the first 64 facts (never seen in training), with their answers
$PY - "$WORK/heldout.txt" <<'PYEOF'
import sys, memedit
from memedit.world.facts import world_of
w = world_of(memedit.load())
open(sys.argv[1], "w").write("".join(f"{p} {f.target_true} .\n" for f in w.facts[:64] for p in f.heldout_paraphrases))
PYEOF

$MEMEDIT keys adapt "$WORK/heldout.txt" --model "$WORK/model" --steps 20 --out "$WORK/adapt.safetensors"
$MEMEDIT verify --model "$WORK/model" --limit 1000 --dtypes float32   # still exact after the change
$MEMEDIT keys revert "$WORK/adapt.safetensors" --model "$WORK/model"  # bit-exact undo
