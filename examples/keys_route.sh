#!/usr/bin/env bash
# memedit keys route: write a new fact into an unused slot, report collateral, then undo it.
set -euo pipefail
MEMEDIT=${MEMEDIT:-memedit}
PY=${PY:-python3}
WORK=${1:-/tmp/memedit-route}
rm -rf "$WORK" && mkdir -p "$WORK"

$MEMEDIT convert "$WORK/model"
# a fact of the demo world, routed to a new answer (its target_new)
read -r PROMPT SUBJECT TARGET < <($PY -c "
import memedit
from memedit.world.facts import world_of
f = world_of(memedit.load()).facts[7]
print(f.prompt.replace(' ', '_'), f.subject, f.target_new)")
PROMPT=${PROMPT//_/ }

$MEMEDIT generate "${PROMPT/\{\}/$SUBJECT}" --model "$WORK/model" -n 6
$MEMEDIT keys route --prompt "$PROMPT" --subject "$SUBJECT" --target "$TARGET" --model "$WORK/model" \
    --eval-facts 0 --out "$WORK/route.safetensors"
$MEMEDIT generate "${PROMPT/\{\}/$SUBJECT}" --model "$WORK/model" -n 6
$MEMEDIT keys revert "$WORK/route.safetensors" --model "$WORK/model"
