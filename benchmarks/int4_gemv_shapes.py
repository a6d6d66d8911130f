"""llama-3-8b's int4 g128 decode linears, one row of x, called as a decode step calls them (qkv with the norm and
RoPE, o_proj with the residual, gate_up with the norm and SwiGLU, down_proj with the residual): gemv's tuner times
every candidate in a CUDA graph over weight copies past L2 (FLINT_GEMV_CACHE=0: no stored picks), and this prints
its pick and the best Triton and cuda_kernels config of each shape, in us and GB/s of int4 bytes, beside the copy
bandwidth measured in the same run, and every cuda_kernels config's time (cuda_all_us). One JSON object a line.
GPU only.

    python benchmarks/int4_gemv_shapes.py
"""
import json
import os
import sys

os.environ.setdefault("FLINT_GEMV_CACHE", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import gemv  # noqa: E402
from bench import copy_bandwidth  # noqa: E402

G, D = 128, 128


def weights(N, K):
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    sz = torch.stack([torch.rand(N, K // G) * 0.02 + 0.001, torch.randn(N, K // G) * 0.01], -1)
    return packed, sz.to(torch.bfloat16).cuda()


def main():
    torch.manual_seed(0)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    x, x_down = torch.randn(1, 4096, **bf16), torch.randn(1, 14336, **bf16)
    norm = torch.ones(4096, **bf16)
    cos, sin = torch.randn(1, D, **bf16), torch.randn(1, D, **bf16)
    shapes = {
        "qkv": (6144, 4096, x, dict(norm_weight=norm, eps=1e-5, rope_cos=cos, rope_sin=sin, rope_rows=5120)),
        "o_proj": (4096, 4096, x, dict(residual=torch.randn(1, 4096, **bf16))),
        "gate_up": (28672, 4096, x, dict(glu=True, norm_weight=norm, eps=1e-5)),
        "down_proj": (4096, 14336, x_down, dict(residual=torch.randn(1, 4096, **bf16))),
    }
    copy = copy_bandwidth(torch.device("cuda"))
    for name, (N, K, xx, kwargs) in shapes.items():
        packed, sz = weights(N, K)
        gemv.int4_linear(xx, packed, sz, G, **kwargs)
        key = next(k for k in gemv.tuning_log() if k[2] == N and k[3] == K)
        pick, times = gemv.tuning_log()[key]
        nbytes = N * K // 2 + N * K // G * 4
        row = {"shape": name, "N": N, "K": K, "int4_mb": round(nbytes / 1e6, 1), "pick": "/".join(map(str, pick)),
               "copy_gb_per_s": round(copy, 1)}
        for label, keep in (("triton", lambda c: not c[0].startswith("int4_cu")),
                            ("cuda", lambda c: c[0].startswith("int4_cu"))):
            mine = {c: t for c, t in times.items() if keep(c)}
            if mine:
                best = min(mine, key=mine.get)
                row.update({f"{label}_best": "/".join(map(str, best)), f"{label}_us": round(mine[best] * 1e3, 2),
                            f"{label}_gb_per_s": round(nbytes / mine[best] / 1e6, 1)})
        row["cuda_all_us"] = {"/".join(map(str, c)): round(t * 1e3, 2)
                              for c, t in sorted(times.items(), key=lambda i: i[1]) if c[0].startswith("int4_cu")}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
