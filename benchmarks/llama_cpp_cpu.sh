#!/usr/bin/env bash
# The CPU int4 target's reference on this machine: llama.cpp's llama-bench (tg128 @ d256: 128 tokens generated
# after a 256-token context, batch 1; ours generates 256 after 128) on the embedded model's own Q4_1 GGUF,
# alternating with `bench.py decode --compile --quant int4`, 2 threads each.
# llama.cpp is built once from the llama-cpp-python source package (PyPI carries its llama.cpp tree; ~10 min on
# 2 cores) into $LLAMA_CPP_DIR (default /tmp/llama-cpp).
#   benchmarks/llama_cpp_cpu.sh [ROUNDS]
set -euo pipefail
export PYTHONPATH=.
dir=${LLAMA_CPP_DIR:-/tmp/llama-cpp}
bin=$(ls "$dir"/*/vendor/llama.cpp/build/bin/llama-bench 2>/dev/null | head -1 || true)
if [ -z "$bin" ]; then
  mkdir -p "$dir"
  python -m pip download -q --no-deps --no-binary=:all: llama-cpp-python -d "$dir"
  tar xzf "$dir"/llama_cpp_python-*.tar.gz -C "$dir"
  src=$(ls -d "$dir"/llama_cpp_python-*/vendor/llama.cpp | head -1)
  cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > "$dir/cmake.log"
  ninja -C "$src/build" llama-bench > "$dir/build.log"
  bin=$src/build/bin/llama-bench
fi
gguf=$(python -c "import weights; print(weights.default_model_path())")  # the embedded model, or an error saying how to install it
for round in $(seq "${1:-2}"); do
  "$bin" -m "$gguf" -t 2 -p 0 -n 128 -d 256 -r 3 -o json | python -c "import json, sys; r = json.load(sys.stdin)[0]; print(json.dumps({'engine': 'llama.cpp ' + r['build_commit'], 'test': 'tg128 @ d256', 'tok_per_s': round(r['avg_ts'], 2)}))"
  python bench.py decode --device cpu --compile --quant int4 --no-ref --repeats 3 --json 2>/dev/null | tail -1 | python -c "import json, sys; r = json.loads(sys.stdin.read()); print(json.dumps({'engine': 'flint', 'test': 'decode int4 compiled, prompt 128, 256 new', **{k: r[k] for k in ('tok_per_s', 'copy_gb_per_s', 'compile_s')}}))"
done
