"""cuda_kernels' bf16 tensor-core GEMV (gemv's "bf16_cu" configs) against cuBLAS on llama-3-8b's decode linears at
a few rows of x: every config, plain and with the fusions a decode step asks (qkv with the norm and RoPE, o_proj and
down_proj with the residual, gate_up with the norm and SwiGLU), each timed as gemv's tuner times (gemv.time_in_graph:
a CUDA graph of back-to-back calls over weight copies past L2, best of 3), in us a call, beside the copy bandwidth
measured in the same run and the floor it sets for the shape's bytes. One JSON object a line. GPU with nvcc only.

    python benchmarks/bf16_gemv_shapes.py [ROWS]     # ROWS: 1..8, default 8
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cuda_kernels  # noqa: E402
import gemv  # noqa: E402
from bench import copy_bandwidth  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down_proj", 4096, 14336),
          ("lm_head", 128256, 4096)]


def main():
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    if not 1 <= rows <= cuda_kernels.MMA_MAX_ROWS:
        sys.exit(f"bf16_gemv_shapes: ROWS must be 1..{cuda_kernels.MMA_MAX_ROWS}, got {rows}")
    if not torch.cuda.is_available() or not cuda_kernels.available("cuda"):
        sys.exit(f"bf16_gemv_shapes: needs a CUDA GPU and nvcc ({cuda_kernels.build_error() or 'no GPU'})")
    torch.manual_seed(0)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    copy = copy_bandwidth(torch.device("cuda"))
    configs = [("bf16_cu", t, u, w, 1) for t, u in cuda_kernels.MMA_INSTANCES for w in (4, 8)]
    name_of = lambda c: "/".join(map(str, c[1:4]))  # noqa: E731
    for name, N, K in SHAPES:
        w = torch.randn(N, K, **bf16) / 64
        nbytes = N * K * 2
        copies = max(1, min(-(-gemv.TUNE_BYTES // nbytes), 64))
        ws = [w] + [w.clone() for _ in range(copies - 1)]
        x = torch.randn(rows, K, **bf16)

        def us(fn):
            return round(gemv.time_in_graph(lambda i: fn(ws[i]), copies, max(2 * copies, 24)) * 1000, 2)

        row = {"shape": name, "rows": rows, "mb": round(nbytes / 1e6, 1), "copy_gb_per_s": round(copy, 1),
               "floor_us": round(nbytes / copy / 1e3, 2), "cublas_us": us(lambda w_: F.linear(x, w_))}
        ref = F.linear(x, w).float()
        plain, fused = {}, {}
        for c in configs:
            err = float((gemv._run_dense(x, w, None, c).float() - ref).abs().max() / ref.abs().max())
            plain[name_of(c)] = us(lambda w_, c=c: gemv._run_dense(x, w_, None, c)) if err < 1e-2 else f"wrong ({err:.3g})"
        # the fusions a decode step asks of this shape: (glu, norm, residual, rope); RoPE and SwiGLU pair tiles
        norm = (torch.ones(K, **bf16), 1e-5)
        cos = torch.ones(rows, 128, **bf16)
        fusion = {"qkv": (False, norm, None, (cos, torch.zeros_like(cos), 5120)), "gate_up": (True, norm, None, None),
                  "o_proj": (False, None, torch.randn(rows, N, **bf16), None),
                  "down_proj": (False, None, torch.randn(rows, N, **bf16), None)}.get(name)
        for c in configs:
            if fusion is not None and (fusion[2] is not None or c[1] % 2 == 0):
                fused[name_of(c)] = us(lambda w_, c=c: gemv._run_dense(x, w_, None, c, *fusion))
        row["bf16_cu_us"] = plain
        if fused:
            row["bf16_cu_fused_us"] = fused
        print(json.dumps(row), flush=True)
        del ws, w
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
