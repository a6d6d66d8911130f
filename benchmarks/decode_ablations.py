"""What each piece of a decode step costs, measured by taking it out: bench.py decode with parts of the step
replaced by nothing (the output is garbage, the timing is real). A piece's cost is the step time with it minus the
step time without it, in the same run; a profiler's per-kernel times overlap where kernels launch early (PDL),
this does not. Meant for the GPU: a CPU step takes other paths, most of which these leave alone.

    python benchmarks/decode_ablations.py VARIANTS [bench.py decode arguments]
    python benchmarks/decode_ablations.py noattn decode --preset llama-3-8b --batch-size 8 --no-ref --json

VARIANTS, comma-separated (base: none):
  noattn    the decode attention's kernels launch nothing (kv.decode_attention, Triton path)
  nomerge   its merge kernel launches nothing
  norope    no RoPE where the linears rotate after their kernel (at more than one row)
  noglu     no SiLU(gate) * up kernel after a gate_up kernel without the GLU epilogue (an empty tensor instead)
  nonorm    no RMSNorm where a linear's kernel does not take it (at more than one row)
  noadd     no residual add after the MLP (a block returns the MLP's output)
  sNwW      the Triton attention with N key slots and W warps a program (kv.DECODE_SPLIT, kv.DECODE_WARPS)
"""
import functools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench  # noqa: E402
import gemv  # noqa: E402
import kv  # noqa: E402
import model  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


TILE = re.compile(r"s(\d+)w(\d+)")  # sNwW: N key slots, W warps a program


def apply(variants: set[str]):
    unknown = {v for v in variants if v not in ("base", "noattn", "nomerge", "norope", "noglu", "nonorm", "noadd")
               and not TILE.fullmatch(v)}
    if unknown:
        print(f"decode_ablations: unknown variant(s) {sorted(unknown)}; see --help", file=sys.stderr)
        sys.exit(2)
    if variants & {"noattn", "nomerge"}:
        kernels = kv._decode_kernels

        @functools.cache
        def without():
            split, merge = kernels()
            return (_NoLaunch() if "noattn" in variants else split), _NoLaunch()
        kv._decode_kernels = without
    for v in variants:
        if tile := TILE.fullmatch(v):
            kv.DECODE_SPLIT, kv.DECODE_WARPS = map(int, tile.groups())
    if "norope" in variants:
        gemv.rope_heads = lambda y, cos, sin, rows: y
    if "noglu" in variants:
        gemv.silu_mul = lambda y: y.new_empty(*y.shape[:-1], y.shape[-1] // 2)
    if "nonorm" in variants:
        gemv.rms_norm = lambda x, weight, eps: x
    if "noadd" in variants:
        model.FeedForward.forward = lambda self, x, norm=None, residual=None: model.linear(
            self.down_proj, model.linear(self.gate_up_proj, x, norm, glu=True))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    apply(set(sys.argv[1].split(",")))
    sys.argv = ["bench.py"] + sys.argv[2:]
    bench.main()
