#!/usr/bin/env bash
# A/B of int4_h2x (x loaded in the words' layout) against int4_h2 on the llama-3-8b int4 g128 decode: one tuned
# run picks the configs, then the same picks pinned (FLINT_GEMV_PICKS) with int4_h2 and with int4_h2x in its
# place, alternating. Prints tok/s of each run.
set -euo pipefail
export PYTHONPATH=.
args="decode --preset llama-3-8b --quant int4 --group-size 128 --no-ref --json"
dir=$(mktemp -d)
python bench.py $args | tail -1 > "$dir/tuned.json"
python - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
row = json.load(open(f"{d}/tuned.json"))
print("tuned", row["tok_per_s"], row["gemv_picks"])
picks = row["gemv_picks"]
json.dump(picks, open(f"{d}/h2.json", "w"))
json.dump({k: v.replace("int4_h2/", "int4_h2x/") for k, v in picks.items()}, open(f"{d}/h2x.json", "w"))
PY
for run in h2 h2x h2 h2x; do
  FLINT_GEMV_PICKS="$dir/$run.json" python bench.py $args | tail -1 | python -c "import json, sys; r = json.load(sys.stdin); print('$run', r['tok_per_s'], r['bw_fraction'])"
done
