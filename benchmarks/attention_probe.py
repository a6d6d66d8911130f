"""Decode attention alone: llama-3-8b's heads over 32 layers' static caches (384 slots), one CUDA graph, per layer
in us: each layer's attention alone and after a bf16 qkv matmul (cuBLAS, 6144 x 4096), at batch 1 and 8 and
positions 255 and 383. Candidates: kv.decode_attention's Triton split and merge kernels at several (slots, warps)
a program, cuda_kernels' cluster kernel, and a one-pass Triton kernel defined here (a program a row and kv head
looping over the slots with an online softmax, no merge). One JSON object a line; max_err against the default.
GPU only. Timed alone, the ranking need not hold inside a decode step: benchmarks/decode_ablations.py measures
that (BENCHMARKS.md, twenty-first session).

    python benchmarks/attention_probe.py
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import gemv  # noqa: E402
import kv  # noqa: E402

dev, bf = "cuda", torch.bfloat16
H, Hkv, D, S, L = 32, 8, 128, 384, 32
G = H // Hkv


@triton.jit
def loop_kernel(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, Hkv, scale,
                sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, sk_b, sk_h, sk_s, so_b, so_h,
                GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    # q [B, H, 1, D]; the step's k, v [B, Hkv, 1, D]; the cache [B, Hkv, S, D]; o [B, H, 1, D]: program (row,
    # kv head) walks slots 0..pos in BLOCK-slot tiles (Triton pipelines their loads over num_stages)
    bh = tl.program_id(0)
    b, kvh = bh // Hkv, bh % Hkv
    pos = tl.load(pos_ptr + b)
    rg = tl.arange(0, G_PAD)
    rd = tl.arange(0, D)
    h = kvh * GROUP + rg
    base = b * sk_b + kvh * sk_h
    tl.extra.cuda.gdc_wait()
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + rd[None, :], mask=rg[:, None] < GROUP, other=0.0)
    k_new = tl.load(kn_ptr + b * skn_b + kvh * skn_h + rd)
    v_new = tl.load(vn_ptr + b * svn_b + kvh * svn_h + rd)
    tl.extra.cuda.gdc_launch_dependents()
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    for start in range(0, pos + 1, BLOCK):
        rs = start + tl.arange(0, BLOCK)
        seen = rs <= pos
        here = rs == pos
        off = base + rs[:, None].to(tl.int64) * sk_s + rd[None, :]
        k = tl.load(k_ptr + off, mask=(seen & ~here)[:, None], other=0.0)
        v = tl.load(v_ptr + off, mask=(seen & ~here)[:, None], other=0.0)
        k = tl.where(here[:, None], k_new[None, :], k)
        v = tl.where(here[:, None], v_new[None, :], v)
        s = tl.dot(q, tl.trans(k)) * scale                                    # [G, BLOCK]
        s = tl.where(seen[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)                # [G, D]
        m = m_new
    o = acc / l[:, None]
    tl.store(o_ptr + b * so_b + h[:, None] * so_h + rd[None, :], o.to(o_ptr.dtype.element_ty),
             mask=rg[:, None] < GROUP)
    slot = base + pos.to(tl.int64) * sk_s + rd
    tl.store(k_ptr + slot, k_new)
    tl.store(v_ptr + slot, v_new)


def loop_attention(q, k, v, kc, vc, pos, block, warps, stages):
    B = q.shape[0]
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    loop_kernel[(B * Hkv,)](q, k, v, kc, vc, pos, out, Hkv, 1 / math.sqrt(D), q.stride(0), q.stride(1),
                            k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc.stride(0), kc.stride(1),
                            kc.stride(2), out.stride(0), out.stride(1), GROUP=G, G_PAD=16, D=D, BLOCK=block,
                            num_warps=warps, num_stages=stages, launch_pdl=True)
    return out


def per_layer_us(call) -> float:
    # call(i) runs layer i's piece; all L layers back to back in one CUDA graph, as gemv's tuner times (best of 3)
    return gemv.time_in_graph(call, L, L) * 1000


def main():
    torch.manual_seed(0)
    Wq = [torch.randn(6144, 4096, device=dev, dtype=bf) * 0.02 for _ in range(L)]
    for B in (8, 1):
        x = torch.randn(B, 4096, device=dev, dtype=bf)
        caches = [(torch.randn(B, Hkv, S, D, device=dev, dtype=bf), torch.randn(B, Hkv, S, D, device=dev, dtype=bf))
                  for _ in range(L)]
        qkv = torch.randn(B, 1, H + 2 * Hkv, D, device=dev, dtype=bf)
        q = qkv[:, :, :H].transpose(1, 2)
        k, v = qkv[:, :, H:H + Hkv].transpose(1, 2), qkv[:, :, H + Hkv:].transpose(1, 2)
        qkv_us = per_layer_us(lambda i: torch.nn.functional.linear(x, Wq[i]))
        print(json.dumps({"batch": B, "kernel": "qkv cuBLAS", "us_a_layer": round(qkv_us, 2)}), flush=True)
        for p in (255, 383):
            pos = torch.full((B,), p, device=dev, dtype=torch.long)
            ref = None
            for mode, split, warps in [("triton", 64, 4), ("triton", 64, 8), ("triton", 32, 2), ("triton", 32, 4),
                                       ("triton", 128, 8), ("cluster", 0, 0), ("loop", 64, 4), ("loop", 64, 8),
                                       ("loop", 32, 4), ("loop", 128, 8)]:
                os.environ["FLINT_CUDA_ATTENTION"] = "1" if mode == "cluster" else "0"
                kv.DECODE_SPLIT, kv.DECODE_WARPS = (split, warps) if mode == "triton" else (64, 4)
                for stages in ((2, 3) if mode == "loop" else (1,)):
                    if mode == "loop":
                        def att(kc, vc, stages=stages, split=split, warps=warps):
                            return loop_attention(q, k, v, kc, vc, pos, split, warps, stages)
                    else:
                        def att(kc, vc, cluster=mode == "cluster"):
                            return kv.decode_attention(q, k, v, kc, vc, pos, 0, cluster)
                    row = {"batch": B, "pos": p, "kernel": mode, "slots": split, "warps": warps, "stages": stages}
                    try:
                        o = att(*caches[0]).float()
                        ref = o if ref is None else ref
                        row["max_err"] = (o - ref).abs().max().item()
                        row["alone_us"] = round(per_layer_us(lambda i: att(*caches[i])), 2)
                        row["after_qkv_us"] = round(per_layer_us(
                            lambda i: (torch.nn.functional.linear(x, Wq[i]), att(*caches[i]))), 2)
                    except Exception as e:  # a config that does not build or fit
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
