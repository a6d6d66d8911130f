#!/usr/bin/env bash
# Start-up of `bench.py decode` three ways: cold (fresh Triton, inductor and gemv-picks caches), with warm
# compile caches but no stored picks (every shape's candidates timed again, as before picks persisted), and
# fully warm (the picks of the first run taken back untimed). Prints compile_s (start of the request to its
# first decoded token) and the process's wall time.
#   benchmarks/warm_start.sh --preset smollm2-135m --quant int4 --prompt-len 6
set -euo pipefail
export PYTHONPATH=.
cache=$(mktemp -d)
export TRITON_CACHE_DIR=$cache/triton TORCHINDUCTOR_CACHE_DIR=$cache/inductor
for run in cold no_picks warm; do
  picks=$cache/picks.json
  [ $run = no_picks ] && picks=$cache/picks_unused.json && rm -f "$picks"
  t0=$(date +%s.%N)
  FLINT_GEMV_CACHE=$picks python bench.py decode "$@" --no-ref --repeats 1 --json > "$cache/row.json"
  t1=$(date +%s.%N)
  python - "$cache/row.json" "$run" "$t0" "$t1" <<'PY'
import json, sys
row = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(json.dumps({"run": sys.argv[2], "wall_s": round(float(sys.argv[4]) - float(sys.argv[3]), 1),
                  **{k: row[k] for k in ("model", "compile_s", "ttft_s", "tok_per_s") if k in row}}))
PY
done
rm -rf "$cache"
