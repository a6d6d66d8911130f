#!/usr/bin/env bash
# Cold start of `bench.py decode` (fresh Triton, inductor and gemv-picks caches each run): gemv's tuner compiling its
# candidates one at a time as it times them (FLINT_GEMV_PARALLEL_COMPILE=0) against all at once in threads
# (the default). Prints compile_s (start of the request to its first decoded token) and the process's wall time.
#   benchmarks/cold_start.sh --preset llama-3-8b --quant int4 --group-size 128
set -euo pipefail
export PYTHONPATH=.
python -c "import torch, triton; from importlib.util import find_spec as f; print('torch', torch.__version__, 'triton', triton.__version__, 'async compile:', f('triton.runtime._async_compile') is not None)"
for parallel in ${PARALLEL:-0 1}; do
  cache=$(mktemp -d)
  t0=$(date +%s.%N)
  TRITON_CACHE_DIR=$cache/triton TORCHINDUCTOR_CACHE_DIR=$cache/inductor FLINT_GEMV_CACHE=$cache/picks.json \
    FLINT_GEMV_PARALLEL_COMPILE=$parallel \
    python bench.py decode "$@" --no-ref --repeats 1 --json > "$cache/row.json"
  t1=$(date +%s.%N)
  python - "$cache/row.json" "$parallel" "$t0" "$t1" <<'PY'
import json, sys
row = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(json.dumps({"parallel_compile": sys.argv[2] == "1", "wall_s": round(float(sys.argv[4]) - float(sys.argv[3]), 1),
                  **{k: row[k] for k in ("model", "compile_s", "ttft_s", "tok_per_s", "bw_fraction") if k in row}}))
PY
  rm -rf "$cache"
done
