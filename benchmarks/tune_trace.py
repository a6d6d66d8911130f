"""generate.py with gemv's tuner timed per key: where a cold start's time goes.

    PYTHONPATH=. python benchmarks/tune_trace.py --model M.gguf --device cuda --compile --quant int4 --prompt "..."

Prints, per tuning key (op, rows bucket, N, K, group), the candidates' count, the seconds they took (compiles and
timing) and the pick, then generate.py's own output.
"""
import runpy
import sys
import time

import gemv

_pick = gemv._pick
_start = time.perf_counter()


def timed_pick(key, configs, launch, device, weights=()):
    fresh = key not in gemv._best
    t = time.perf_counter()
    cfg = _pick(key, configs, launch, device, weights)
    if fresh:
        print(f"[tune] {gemv.pick_name(key)}: {len(configs)} configs, {time.perf_counter() - t:.1f} s -> "
              f"{'/'.join(map(str, cfg))} (from {t - _start:.1f} s)", file=sys.stderr)
    return cfg


gemv._pick = timed_pick
sys.argv = ["generate.py"] + sys.argv[1:]
runpy.run_path("generate.py", run_name="__main__")
