#!/usr/bin/env bash
# memedit verify: prove the lookups exact against FAISS brute-force search over all N² slot keys.
set -euo pipefail
MEMEDIT=${MEMEDIT:-memedit}
OUT=${1:-/tmp/memedit-verify}
mkdir -p "$OUT"

# 1. lookups on the demo world's text, in the model's dtype, float32 and bfloat16 (exit 1 on a real mismatch)
$MEMEDIT verify --limit 2000

# 2. random query vectors (no tokenizer needed), JSON for scripts
$MEMEDIT verify --random 1000 --dtypes float32 --json > "$OUT/random.json"
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('random queries agree:', d['ok'])" "$OUT/random.json"

# 3. save the checked text queries, then verify them again from the file (as for a standalone memory module)
$MEMEDIT verify --limit 500 --dtypes float32 --save-queries "$OUT/queries.npz" > /dev/null
$MEMEDIT verify --queries "$OUT/queries.npz" --dtypes float32,bfloat16
