"""CUDA C++ kernels for decode on NVIDIA GPUs: the int4 matrix-vector product at one row of x (batch-1 decode), a bf16
one for 1..8 rows on tensor cores, and one-token attention over a static cache in one kernel (sm_90; int4 models
take it at batch 1).

    cuda_kernels.int4_gemv(x2, words, sz, y, group_size, rows, unroll, warps, pdl, norm, residual, glu, rope)
    gemv.int4_linear(...)   # takes it as the "int4_cu" configs, timed against its Triton kernels per shape
    cuda_kernels.bf16_mma(x2, w, y, tiles, unroll, warps, pdl, norm, residual, glu, rope)
    gemv.bf16_linear(...)   # takes it as the "bf16_cu" configs at 2..8 rows, timed against cuBLAS and Triton
    cuda_kernels.decode_attention(q, k, v, k_cache, v_cache, pos, window, out, pdl)
    kv.decode_attention(..., cuda=True)  # takes it where it can (the Engine asks for int4 at batch 1), else Triton

Why: batch-1 decode reads every weight once a token, so a linear is a stream of int4 codes through the cores. The
Triton kernels of gemv.py (int4_h2) reach ~0.5 of the H200's copy bandwidth on llama-3-8b's shapes, where a
kernel that only reads the same bytes reaches ~0.9. Here one warp streams whole rows of W, each lane 16
contiguous bytes (32 codes) of a row at a time, 512 contiguous bytes a row per warp and instruction; x is put
once per block into shared memory, already in the pairs the codes come out in; every load of the next step is
issued before this step's math. On the H200 (in-graph timings, benchmarks/int4_gemv_shapes.py, llama-3-8b int4
g128): qkv 6.6 against int4_h2's 9.1 us, o_proj 4.3 / 6.7, gate_up 17.4 / 27.3 (0.84 of copy bandwidth), down
9.7 / 13.9.

    per 32-bit word (8 codes, c_j in bits 4j..4j+3, column 8w + j):
      LOP3 (w & 0x000F000F) | 0x64006400 -> fp16 pair (1024 + c0, 1024 + c4); the mask << 4 gives 1024 + 16 c1, 16 c5;
      w >> 8 the same for c2, c6 and c3, c7. One fp16x2 FMA a pair makes them (c - 8) / 16 exactly; four fp16x2
      FMAs add the word's 8 products to a lane's pair of fp16 sums (x in fp16: x pairs (x0, x4), (x1, x5), ...).
    per lane and row, every 32 columns: sum += 16 * scale * (the pair's two halves, in fp32) + zero * sum(x over
    the 32); w_real = (q - 8) * scale + zero as quantize.py defines it.

13 instructions per 8 weights, plus ~8 per 32 for the scales. The error is that of int4_h2: products and the 16
sums of a lane in fp16 (x must be an fp16 number, |x| < 65504), all else in fp32. Layout: gemv.py's
(quantize.pack_nibbles, packed uint8 [N, K/2] read as int32 words; scales_zeros bf16 [N, K/G, 2] read as one
int32 a group): nothing is repacked.

A warp owns `rows` rows of W (a "unit") over all of K and walks K in steps of `unroll` x 1024 columns; the grid is
persistent (at most as many blocks as fit on the GPU at once), each warp taking units warp, warp + all warps, ...
With model.linear's fusions: RMSNorm of x as it is put into shared memory (rounded as model.RMSNorm rounds), the
residual add as the output is stored, SwiGLU (glu: a unit's rows are gate rows j.. and their up rows F + j..), RoPE
(rope: rows i.. of a head and their partners i + D/2, any head dim). Launched with programmatic dependent launch
on sm_90: the first step's weights load before griddepcontrol.wait, x and the residual after it, and the next
kernel may launch once x is staged. Compiled instances (rows, unroll): INSTANCES for G in GROUP_SIZES with
K % 1024 == 0, (2, 1) for other K (lanes past K masked).

Tried on the H200 and not kept (BENCHMARKS.md): a tensor-core variant (mma.sync m16n8k16 on the codes as loaded, 16
rows a warp and 64 bytes a row a group, K split over a block's warps: ~5 instructions per 8 weights instead of 13)
was slower on every shape (gate_up 20.6 against 17.6 us, down 11.5 / 9.7); an L2 prefetch of a warp's first unit
before griddepcontrol.wait (decode 601.6 against ~625 tok/s); launch_dependents after the loop instead of after
the staging (598.1 against 616.6); one unit a warp with all of it loaded before griddepcontrol.wait (qkv 7.6 against
6.5 us); fewer blocks than fit, to leave room for the next kernel's (slower on every shape).

decode_attention: a thread block cluster a (row, kv head), up to 16 blocks of 4 warps; a lane holds 8 dims of one
slot's key and value, each lane group an online softmax; lane groups merge by shuffles, a block's warps in shared
memory, and the blocks through distributed shared memory: block r owns slice r of the outputs, every block stores
its partial of each slice into the owner's shared memory, and the owners merge and write. The cache's earlier
slots load before griddepcontrol.wait. On the H200, per layer in a CUDA graph over 32 layers' caches (llama-3-8b
heads, 385 slots, position 383): 4.29 us alone against the Triton split and merge's 4.06, 9.69 against 10.70 after
each layer's int4 qkv GEMV. A first version, where block 0 merged all 16 partials by itself, took 7.5 us.

bf16_mma: mma.sync.m16n8k16 (fp32 sums) with A = 16 rows of W and B = x^T, x's rows the mma's 8 columns; the k
slots are a permutation of the columns that makes every fragment 16 contiguous bytes as loaded (see the kernel's
comment): no shared memory for W or x, no conversions. A block owns tiles of 16 rows, its warps split K, and it
walks its units persistently with the next unit's first loads in flight through its sum and epilogue. On the H200
at 8 rows (in-graph, benchmarks/bf16_gemv_shapes.py; cuBLAS beside it; three machines): o_proj 10.7-11.1 against
12.3-12.4 us, qkv 15.6-15.7 against 14.6-16.6, gate_up 62.6-64.8 against 55.5-60.7, down 31.8-33.1 against
30.9-31.9, the lm head 255-260 against 240-254: the fragments' 8 rows x 64 bytes a warp instruction reach ~0.87 of
copy bandwidth on gate_up (Nsight Compute: 74% of DRAM throughput against cuBLAS's 86%). A first version without persistent blocks (a block a unit, the norm's rstd
computed by each block) timed the same within noise.

Built with nvcc at first use (~10 s, cached in ~/.cache/flint) into a shared library called through ctypes with
torch's current stream (a CUDA graph captures the launch). prebuild(device) starts that build in a background thread
(the Engine calls it before loading weights), so that on a machine's first run it overlaps loading and compiling.
available() is False where there is no nvcc, no GPU of compute capability 8.0 or later, or FLINT_CUDA_KERNELS=0;
gemv.py then keeps its Triton kernels.
"""
import concurrent.futures
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Optional

import torch

CUDA_SOURCE = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <cooperative_groups.h>

namespace cg = cooperative_groups;

struct Args {
    const uint4 *x;          // bf16 [K] as 16-byte words (8 values)
    const uint8_t *w;        // int4 codes [N, K/2]
    const uint32_t *sz;      // (scale, zero) bf16 pairs [N, K/G]
    uint16_t *y;             // bf16 [N] or [N/2] (glu)
    int N, K;
    const uint16_t *norm_w;  // bf16 [K] or null: RMSNorm(x) with this weight
    float eps;
    const uint16_t *res;     // bf16, laid out as y, or null
    int glu;
    const uint16_t *cos, *sin;  // bf16 [D] or null
    int rope_d, rope_rows;
    int n_units;
};

__device__ __forceinline__ float bf16_bits_to_float(uint32_t b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ float round_bf16(float f) { return __bfloat162float(__float2bfloat16_rn(f)); }
__device__ __forceinline__ uint16_t bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t bits) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));
    return r;
}

__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ uint4 load_stream(const uint8_t *p) {
    // read once: not kept in L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void wait_for_producer() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_dependents_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// the rows of W that unit u covers (clamped into W for the loads); pairs (glu, RoPE): rows 2h and 2h + 1 are
// gate j and up F + j, or rows i and i + D/2 of a head
template <int R>
__device__ __forceinline__ void unit_rows(const Args &a, int u, int (&rows)[R]) {
#pragma unroll
    for (int h = 0; h < R; h++) {
        int row;
        if (a.glu || a.rope_d) {
            int p = u * (R / 2) + h / 2;
            if (a.glu) {
                row = p + (h & 1) * (a.N / 2);
                if (p >= a.N / 2) row = a.N - 1;
            } else {
                int half = a.rope_d / 2;
                row = (p / half) * a.rope_d + (h & 1) * half + p % half;
            }
        } else {
            row = u * R + h;
        }
        rows[h] = min(row, a.N - 1);
    }
}

// a lane's pointers into unit u's rows of W (its 16 bytes of the first column step) and of the scales
template <int R, int G>
__device__ __forceinline__ void unit_pointers(const Args &a, int u, int lane, const uint8_t *(&wrow)[R],
                                              const uint32_t *(&srow)[R]) {
    int rows[R];
    unit_rows<R>(a, u, rows);
#pragma unroll
    for (int r = 0; r < R; r++) {
        wrow[r] = a.w + (size_t)rows[r] * (a.K >> 1) + lane * 16;
        srow[r] = a.sz + (size_t)rows[r] * (a.K / G) + lane * 32 / G;
    }
}

// the codes (16 bytes) and the group's (scale, zero) of a lane for column steps step * U .. step * U + U - 1
// (EVEN: K a multiple of 1024, so that a step's lanes are all inside K or all past it)
template <int R, int U, int G, bool EVEN>
__device__ __forceinline__ void load_step(const Args &a, const uint8_t *const (&wrow)[R],
                                          const uint32_t *const (&srow)[R], int step, int lane,
                                          uint4 (&wb)[U][R], uint32_t (&sb)[U][R]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const uint8_t *wp = wrow[r] + step * (U * 512);
        const uint32_t *sp = srow[r] + step * (U * 1024 / G);
#pragma unroll
        for (int u = 0; u < U; u++) {
            int t = step * U + u;
            if (EVEN) {
                if (U == 1 || t * 1024 < a.K) {
                    wb[u][r] = load_stream(wp + u * 512);
                    sb[u][r] = __ldg(sp + u * (1024 / G));
                }
            } else {
                bool ok = t * 1024 + lane * 32 < a.K;
                wb[u][r] = ok ? load_stream(wp + u * 512) : make_uint4(0, 0, 0, 0);
                sb[u][r] = ok ? __ldg(sp + u * (1024 / G)) : 0u;
            }
        }
    }
}

// the epilogue's operands of unit u, lane h < R (plain) or R / 2 (pairs): residual, or RoPE's cos and sin
template <int R>
__device__ __forceinline__ void load_operands(const Args &a, int u, int lane, float &op0, float &op1) {
    op0 = 0.f;
    op1 = 0.f;
    if (a.rope_d) {
        int p = u * (R / 2) + lane;
        if (lane < R / 2 && p < a.N / 2) {
            int i = p % (a.rope_d / 2);
            op0 = bf16_bits_to_float(a.cos[i]);
            op1 = bf16_bits_to_float(a.sin[i]);
        }
    } else if (a.res) {
        int col = a.glu ? u * (R / 2) + lane : u * R + lane;
        int n_out = a.glu ? a.N / 2 : a.N;
        if (lane < (a.glu ? R / 2 : R) && col < n_out) op0 = bf16_bits_to_float(a.res[col]);
    }
}

template <int R>
__device__ __forceinline__ void store_unit(const Args &a, int u, int lane, const float (&acc)[R], float op0, float op1) {
    // acc: the unit's sums (every lane holds all R); lane h stores output h (plain) or pair h
    if (a.glu || a.rope_d) {
        if (lane >= R / 2) return;
        float g = 0.f, v = 0.f;
#pragma unroll
        for (int h = 0; h < R / 2; h++)
            if (h == lane) { g = acc[2 * h]; v = acc[2 * h + 1]; }
        int p = u * (R / 2) + lane;
        if (p >= a.N / 2) return;
        g = round_bf16(g);
        v = round_bf16(v);
        if (a.glu) {
            float out = round_bf16(g / (1.f + expf(-g)) * v);
            if (a.res) out = round_bf16(out + op0);
            a.y[p] = bf16_bits(out);
        } else {
            int half = a.rope_d / 2;
            int ra = (p / half) * a.rope_d + p % half, rb = ra + half;
            if (ra < a.rope_rows) {
                float c = op0, s = op1;
                a.y[ra] = bf16_bits(g * c - v * s);
                a.y[rb] = bf16_bits(v * c + g * s);
            } else {
                a.y[ra] = bf16_bits(g);
                a.y[rb] = bf16_bits(v);
            }
        }
    } else {
        if (lane >= R) return;
        float v = 0.f;
#pragma unroll
        for (int h = 0; h < R; h++)
            if (h == lane) v = acc[h];
        int row = u * R + lane;
        if (row >= a.N) return;
        float out = round_bf16(v);
        if (a.res) out = round_bf16(out + op0);
        a.y[row] = bf16_bits(out);
    }
}

// x (bf16 [K], RMSNorm'd if asked) into shared memory as fp16 pairs in the order the lanes read them: for column
// step t (1024 columns), word i of lane l's 16 bytes at xs[(t * 4 + i) * 32 + l] (16 bytes: the pairs
// (x0, x4), (x1, x5), (x2, x6), (x3, x7) of its 8 columns); xsum[t * 32 + l]: the sum of the lane's 32 x.
// A thread loads its words (up to XB, all loads issued before their use) in one round trip to L2, and with the
// norm keeps them for the block's sum of squares: one round trip in all where K <= 32 * threads (the norm's
// weight was prefetched into L1 before griddepcontrol.wait). Larger K: batches of XB, and the norm reads x twice.
#define XB 4
__device__ __forceinline__ float sum_squares(uint4 v) {
    const uint32_t p[4] = {v.x, v.y, v.z, v.w};
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float lo = bf16_bits_to_float(p[j] & 0xFFFF), hi = __uint_as_float(p[j] & 0xFFFF0000u);
        ss = fmaf(lo, lo, fmaf(hi, hi, ss));
    }
    return ss;
}

__device__ __forceinline__ void prefetch_l1(const void *p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

__device__ __forceinline__ float block_rstd(const Args &a, float ss, float *scratch) {
#pragma unroll
    for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) total += scratch[i];
    return 1.f / sqrtf(total / a.K + a.eps);
}

// one word (8 columns) of x into shared memory; the 4 threads of a lane's 32 columns sum them (whole warps call)
__device__ __forceinline__ void store_word(const Args &a, int wi, int padded, uint4 v, float rstd, uint4 *xs,
                                           float *xsum) {
    const uint32_t p[4] = {v.x, v.y, v.z, v.w};
    float f[8];
#pragma unroll
    for (int q = 0; q < 4; q++) {
        f[2 * q] = bf16_bits_to_float(p[q] & 0xFFFF);
        f[2 * q + 1] = __uint_as_float(p[q] & 0xFFFF0000u);
    }
    if (a.norm_w && wi < a.K / 8) {  // rounded as model.RMSNorm: (x * rstd) to bf16, times the weight, to bf16
        const uint4 g = reinterpret_cast<const uint4 *>(a.norm_w)[wi];
        const uint32_t gq[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            f[2 * q] = round_bf16(round_bf16(f[2 * q] * rstd) * bf16_bits_to_float(gq[q] & 0xFFFF));
            f[2 * q + 1] = round_bf16(round_bf16(f[2 * q + 1] * rstd) * __uint_as_float(gq[q] & 0xFFFF0000u));
        }
    }
    uint32_t pairs[4];
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        __half2 h = __floats2half2_rn(f[q], f[q + 4]);
        float2 back = __half22float2(h);
        sum += back.x + back.y;
        pairs[q] = *reinterpret_cast<uint32_t *>(&h);
    }
    sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
    sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
    if (wi < padded) {
        int t = wi >> 7, l = (wi >> 2) & 31, i = wi & 3;
        xs[(t * 4 + i) * 32 + l] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
        if (i == 0) xsum[t * 32 + l] = sum;
    }
}

__device__ void stage_x(const Args &a, int T, uint4 *xs, float *xsum, float *scratch) {
    const int n_words = a.K / 8, padded = T * 128, threads = blockDim.x;
    for (int base = 0; base < padded; base += XB * threads) {
        uint4 v[XB];
#pragma unroll
        for (int j = 0; j < XB; j++) {
            int wi = base + j * threads + threadIdx.x;
            v[j] = wi < n_words ? a.x[wi] : make_uint4(0, 0, 0, 0);
        }
        float rstd = 1.f;
        if (a.norm_w) {
            float ss = 0.f;
            if (padded <= XB * threads) {  // all of x is in v
#pragma unroll
                for (int j = 0; j < XB; j++) ss += sum_squares(v[j]);
            } else {
                for (int wi = threadIdx.x; wi < n_words; wi += threads) ss += sum_squares(a.x[wi]);
            }
            rstd = block_rstd(a, ss, scratch);
        }
#pragma unroll
        for (int j = 0; j < XB; j++) {
            if (base + j * threads >= padded) break;  // uniform: store_word's shuffles need whole warps
            store_word(a, base + j * threads + threadIdx.x, padded, v[j], rstd, xs, xsum);
        }
    }
}

// a lane's products for one column step t (its 32 columns of each of the R rows) into acc
template <int R>
__device__ __forceinline__ void step_products(const uint4 *xs, const float *xsum, int t, int lane,
                                              const uint4 (&wb)[R], const uint32_t (&sb)[R], float (&acc)[R]) {
    const uint4 *xp = xs + t * 128 + lane;
    const uint4 x0 = xp[0], x1 = xp[32], x2 = xp[64], x3 = xp[96];
    const float xsm = xsum[t * 32 + lane];
    const uint32_t xw[16] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w,
                             x2.x, x2.y, x2.z, x2.w, x3.x, x3.y, x3.z, x3.w};
#pragma unroll
    for (int r = 0; r < R; r++) {
        const uint32_t ws[4] = {wb[r].x, wb[r].y, wb[r].z, wb[r].w};
        uint32_t h = 0;  // a pair of fp16 sums
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint32_t w = ws[i], w8 = w >> 8;
            uint32_t c04 = lop3_and_or(w, 0x000F000Fu, 0x64006400u);   // (1024 + c0, 1024 + c4)
            uint32_t c15 = lop3_and_or(w, 0x00F000F0u, 0x64006400u);   // (1024 + 16 c1, 1024 + 16 c5)
            uint32_t c26 = lop3_and_or(w8, 0x000F000Fu, 0x64006400u);
            uint32_t c37 = lop3_and_or(w8, 0x00F000F0u, 0x64006400u);
            c04 = hfma2(c04, 0x2C002C00u, 0xD408D408u);  // (1024 + c) / 16 - 64.5 = (c - 8) / 16, exact
            c15 = hfma2(c15, 0x1C001C00u, 0xC480C480u);  // (1024 + 16 c) / 256 - 4.5
            c26 = hfma2(c26, 0x2C002C00u, 0xD408D408u);
            c37 = hfma2(c37, 0x1C001C00u, 0xC480C480u);
            h = hfma2(c04, xw[4 * i], h);
            h = hfma2(c15, xw[4 * i + 1], h);
            h = hfma2(c26, xw[4 * i + 2], h);
            h = hfma2(c37, xw[4 * i + 3], h);
        }
        float2 f = __half22float2(*reinterpret_cast<__half2 *>(&h));
        acc[r] = fmaf(f.x + f.y, 16.f * __uint_as_float(sb[r] << 16), acc[r]);
        acc[r] = fmaf(__uint_as_float(sb[r] & 0xFFFF0000u), xsm, acc[r]);
    }
}

template <int R, int U, int G, bool EVEN>
__global__ void __launch_bounds__(512) int4_gemv_kernel(const Args a) {
    extern __shared__ uint4 smem[];
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int T = (a.K + 1023) >> 10, S = (T + U - 1) / U;  // column steps of 1024; steps of U of them a unit
    uint4 *xs = smem;
    float *xsum = reinterpret_cast<float *>(smem + T * 128);
    float *scratch = xsum + T * 32;
    const int all_warps = gridDim.x * warps;

    int unit = blockIdx.x * warps + (threadIdx.x >> 5);
    const uint8_t *wrow[R];
    const uint32_t *srow[R];
    uint4 wb[U][R];
    uint32_t sb[U][R];
    if (unit < a.n_units) {  // W is never written: its first step loads before the previous kernel is done
        unit_pointers<R, G>(a, unit, lane, wrow, srow);
        load_step<R, U, G, EVEN>(a, wrow, srow, 0, lane, wb, sb);
    }
    if (a.norm_w)  // nor is the norm's weight
        for (int wi = threadIdx.x; wi < a.K / 8; wi += blockDim.x) prefetch_l1(a.norm_w + 8 * wi);
    wait_for_producer();
    stage_x(a, T, xs, xsum, scratch);
    __syncthreads();
    let_dependents_launch();  // early: the next kernel's first weights load during this one (at the loop's end: slower)

    for (; unit < a.n_units; unit += all_warps) {
        float op0, op1;  // the epilogue's operands, loaded while the unit's products run
        load_operands<R>(a, unit, lane, op0, op1);
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.f;
        const uint8_t *next_wrow[R];
        const uint32_t *next_srow[R];
        for (int step = 0; step < S; step++) {
            uint4 nwb[U][R];
            uint32_t nsb[U][R];
            if (step + 1 < S) {  // the next step's loads in flight during this step's math
                load_step<R, U, G, EVEN>(a, wrow, srow, step + 1, lane, nwb, nsb);
            } else if (unit + all_warps < a.n_units) {
                unit_pointers<R, G>(a, unit + all_warps, lane, next_wrow, next_srow);
                load_step<R, U, G, EVEN>(a, next_wrow, next_srow, 0, lane, nwb, nsb);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int t = step * U + u;
                if (U > 1 && t >= T) break;
                step_products<R>(xs, xsum, t, lane, wb[u], sb[u], acc);
            }
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int r = 0; r < R; r++) {
                    wb[u][r] = nwb[u][r];
                    sb[u][r] = nsb[u][r];
                }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
#pragma unroll
            for (int o = 16; o; o >>= 1) acc[r] += __shfl_xor_sync(0xFFFFFFFFu, acc[r], o);
        }
        store_unit<R>(a, unit, lane, acc, op0, op1);
#pragma unroll
        for (int r = 0; r < R; r++) {
            wrow[r] = next_wrow[r];
            srow[r] = next_srow[r];
        }
    }
}

// ---------------------------------------------------------------- launches

// how many blocks of `warps` warps and `smem` bytes fit on the GPU at once (0 where the API cannot tell)
static cudaError_t blocks_that_fit(const void *kernel, int warps, size_t smem, int *fit) {
    cudaError_t e;
    int device, sms, per_sm = 0;
    *fit = 0;
    if ((e = cudaGetDevice(&device)) != cudaSuccess) return e;
    if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return e;
    if ((e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps * 32, smem)) != cudaSuccess)
        return e;
    *fit = per_sm * sms;
    return cudaSuccess;
}

// a launch on stream, with programmatic dependent launch where pdl
static int launch_on(const void *kernel, void **args, int blocks, int warps, size_t smem, int pdl, cudaStream_t stream) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(warps * 32);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return (int)cudaLaunchKernelExC(&cfg, kernel, args);
}

static int launch_kernel(const void *kernel, Args a, int units, size_t smem, int warps, int pdl, cudaStream_t stream) {
    cudaError_t e;
    if (smem > 48 * 1024) {
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    int fit;
    if ((e = blocks_that_fit(kernel, warps, smem, &fit)) != cudaSuccess) return (int)e;
    a.n_units = units;
    int blocks = (units + warps - 1) / warps;
    if (fit > 0 && blocks > fit) blocks = fit;  // persistent: the rest loop
    void *args[] = {&a};
    return launch_on(kernel, args, blocks, warps, smem, pdl, stream);
}

template <int R, int U, int G, bool EVEN>
static int launch(const Args &a, int warps, int pdl, cudaStream_t stream) {
    const int T = (a.K + 1023) >> 10;
    const size_t smem = (size_t)T * 128 * 16 + (size_t)T * 32 * 4 + 32 * 4;
    const int P = R >= 2 ? R / 2 : 1;  // pairs a unit
    const int units = a.glu || a.rope_d ? (a.N / 2 + P - 1) / P : (a.N + R - 1) / R;
    return launch_kernel((const void *)int4_gemv_kernel<R, U, G, EVEN>, a, units, smem, warps, pdl, stream);
}

extern "C" int flint_int4_gemv(const void *x, const void *w, const void *sz, void *y, int N, int K, int G,
                               const void *norm_w, float eps, const void *res, int glu, const void *cos,
                               const void *sin, int rope_d, int rope_rows, int rows, int unroll, int warps, int pdl,
                               void *stream) {
    Args a = {(const uint4 *)x, (const uint8_t *)w, (const uint32_t *)sz, (uint16_t *)y, N, K,
              (const uint16_t *)norm_w, eps, (const uint16_t *)res, glu, (const uint16_t *)cos,
              (const uint16_t *)sin, rope_d, rope_rows, 0};
    cudaStream_t s = (cudaStream_t)stream;
    const bool even = K % 1024 == 0;
#define FLINT_CASE(R_, U_, G_, EVEN_) \
    if (rows == R_ && unroll == U_ && G == G_ && even == EVEN_) return launch<R_, U_, G_, EVEN_>(a, warps, pdl, s);
#define FLINT_CASES(G_) \
    FLINT_CASE(2, 1, G_, true) FLINT_CASE(2, 2, G_, true) FLINT_CASE(2, 4, G_, true) FLINT_CASE(4, 1, G_, true) \
    FLINT_CASE(2, 1, G_, false)
    FLINT_CASES(32) FLINT_CASES(64) FLINT_CASES(128)
#undef FLINT_CASES
#undef FLINT_CASE
    return -1;
}

// ---------------------------------------------------------------- bf16 GEMV at 1..8 rows of x (tensor cores)
// y [M, N] = x [M, K] @ W^T for M <= 8 with mma.sync.m16n8k16 (fp32 sums): A = 16 rows of W, B = x^T (its 8
// columns the rows of x). The k slots of an mma are a permutation of 16 of W's columns, chosen so that a lane's
// fragments are contiguous in memory: for a chunk of 32 columns lane (g, t) (g = lane / 4, t = lane % 4) loads
// 16 bytes of W's rows g and g + 8 (columns 8t .. 8t + 7) and 16 bytes of x's row g (the same columns), which feed
// two mmas (columns 8t .. 8t + 3, then 8t + 4 .. 8t + 7) as loaded: no shuffles, no conversions, no shared memory.
// A block owns a unit of RT tiles of 16 rows of W; its warps split K (warp w takes steps w, w + warps, ..., a step
// U chunks), each with the next step's loads in flight during this step's mmas, and sum in shared memory.
// Fusions (model.linear's): RMSNorm of x (NORM: each block sums the squares of x's rows first, then normalizes a
// fragment as it comes, rounded as model.RMSNorm rounds), the residual add, SwiGLU (glu: tiles 0..P-1 gate rows,
// P..2P-1 their up rows, P = RT / 2) and RoPE (rope: tiles of the first and second halves of a head). x is read
// through L1 (every block reads all of it; W bypasses L1). W's first step loads before griddepcontrol.wait.

struct MmaArgs {
    const uint16_t *x;          // bf16 [M, K], row stride ldx
    const uint16_t *w;          // bf16 [N, K]
    uint16_t *y;                // bf16 [M, N] or [M, N / 2] (glu), row stride ldy
    const uint16_t *res;        // bf16 laid out as y, or null
    const uint16_t *norm_w;     // bf16 [K] (NORM)
    const uint16_t *cos, *sin;  // bf16 [M, rope_d] or null
    int M, N, K, ldx, ldy;
    float eps;
    int glu, rope_d, rope_rows;
};

__device__ __forceinline__ uint4 load_x16(const uint16_t *p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// model.RMSNorm's rounding of a pair: (x * rstd) to bf16, times the weight (bf16 x bf16, rounded once)
__device__ __forceinline__ uint32_t norm_pair(uint32_t xw, uint32_t gw, float rstd) {
    __nv_bfloat162 xn = __floats2bfloat162_rn(__uint_as_float(xw << 16) * rstd,
                                              __uint_as_float(xw & 0xFFFF0000u) * rstd);
    __nv_bfloat162 p = __hmul2(xn, *reinterpret_cast<__nv_bfloat162 *>(&gw));
    return *reinterpret_cast<uint32_t *>(&p);
}

// the first row of W of tile r of unit u (see MmaArgs; rows past N are clamped by the loads, not stored)
template <int RT>
__device__ __forceinline__ int mma_tile_base(const MmaArgs &a, int u, int r) {
    constexpr int P = RT >= 2 ? RT / 2 : 1;
    if (a.glu) return (r < P ? 0 : a.N / 2) + (u * P + r % P) * 16;
    if (a.rope_d) {
        const int half = a.rope_d / 2, p0 = (u * P + r % P) * 16;  // the tile's first pair (half % 16 == 0)
        return (p0 / half) * a.rope_d + p0 % half + (r < P ? 0 : half);
    }
    return (u * RT + r) * 16;
}

template <int RT, int U>
__device__ __forceinline__ void mma_load_w(const uint16_t *const (&w0)[RT], const uint16_t *const (&w1)[RT],
                                           int step, int chunks, uint4 (&wa)[U][RT], uint4 (&wb)[U][RT]) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = step * U + u;
#pragma unroll
        for (int r = 0; r < RT; r++) {
            wa[u][r] = c < chunks ? load_stream(reinterpret_cast<const uint8_t *>(w0[r] + c * 32)) : make_uint4(0, 0, 0, 0);
            wb[u][r] = c < chunks ? load_stream(reinterpret_cast<const uint8_t *>(w1[r] + c * 32)) : make_uint4(0, 0, 0, 0);
        }
    }
}

template <int U, bool NORM>
__device__ __forceinline__ void mma_load_x(const uint16_t *xp, const uint16_t *gp, bool has_x, int step, int chunks,
                                           uint4 (&xv)[U], uint4 (&gv)[U]) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = step * U + u;
        const bool ok = has_x && c < chunks;
        xv[u] = ok ? load_x16(xp + c * 32) : make_uint4(0, 0, 0, 0);
        if (NORM) gv[u] = ok ? load_x16(gp + c * 32) : make_uint4(0, 0, 0, 0);
    }
}

template <int RT, int U, bool NORM>
__device__ __forceinline__ void mma_step(const uint4 (&wa)[U][RT], const uint4 (&wb)[U][RT], const uint4 (&xv)[U],
                                         const uint4 (&gv)[U], float rstd, float (&acc)[RT][2][4]) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        uint4 xb = xv[u];
        if (NORM) {
            xb.x = norm_pair(xb.x, gv[u].x, rstd);
            xb.y = norm_pair(xb.y, gv[u].y, rstd);
            xb.z = norm_pair(xb.z, gv[u].z, rstd);
            xb.w = norm_pair(xb.w, gv[u].w, rstd);
        }
#pragma unroll
        for (int r = 0; r < RT; r++) {
            mma_bf16(acc[r][0], wa[u][r].x, wb[u][r].x, wa[u][r].y, wb[u][r].y, xb.x, xb.y);
            mma_bf16(acc[r][1], wa[u][r].z, wb[u][r].z, wa[u][r].w, wb[u][r].w, xb.z, xb.w);
        }
    }
}

// the block's sum for tile r, row m (0..15) of the tile, row n of x: the fragments' (m, n) is at lane
// (m % 8) * 4 + n / 2, element (m / 8) * 2 + n % 2
template <int RT>
__device__ __forceinline__ float mma_sum(const float *red, int warps, int r, int m, int n) {
    const int lane = (m & 7) * 4 + (n >> 1), i = (m >> 3) * 2 + (n & 1);
    float s = 0.f;
    for (int w = 0; w < warps; w++) s += red[((w * RT + r) * 4 + i) * 32 + lane];
    return s;
}

template <int RT>
__device__ __forceinline__ void mma_unit_pointers(const MmaArgs &a, int unit, int g, int t, const uint16_t *(&w0)[RT],
                                                  const uint16_t *(&w1)[RT]) {
#pragma unroll
    for (int r = 0; r < RT; r++) {
        const int base = mma_tile_base<RT>(a, unit, r);
        w0[r] = a.w + (size_t)min(base + g, a.N - 1) * a.K + 8 * t;
        w1[r] = a.w + (size_t)min(base + g + 8, a.N - 1) * a.K + 8 * t;
    }
}

// persistent: block b takes units b, b + blocks, ...; during a unit's last step each warp loads the next unit's
// first one, so that W streams on through the block's sum and epilogue (shared memory in two halves by parity:
// one barrier a unit)
template <int RT, int U, bool NORM>
__global__ void __launch_bounds__(256) bf16_mma_kernel(const MmaArgs a, int n_units) {
    extern __shared__ float red[];  // [2][warps][RT][4][32] partial sums
    __shared__ float rstd_s[8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunks = a.K >> 5, steps = (chunks + U - 1) / U;
    const int red_half = warps * RT * 128;
    const uint16_t *w0[RT], *w1[RT];
    int unit = blockIdx.x;
    mma_unit_pointers<RT>(a, unit, g, t, w0, w1);
    const bool has_x = g < a.M;
    const uint16_t *xp = a.x + (size_t)(has_x ? g : 0) * a.ldx + 8 * t;
    const uint16_t *gp = NORM ? a.norm_w + 8 * t : nullptr;

    uint4 wa[U][RT], wb[U][RT], xv[U], gv[U];
    mma_load_w<RT, U>(w0, w1, warp, chunks, wa, wb);  // W is never written: before the previous kernel is done
    wait_for_producer();
    float rstd = 1.f;
    if (NORM) {  // a warp a row of x: its sum of squares (once a block)
        for (int n = warp; n < a.M; n += warps) {
            const uint16_t *row = a.x + (size_t)n * a.ldx;
            float ss = 0.f;
#pragma unroll 4
            for (int i = lane * 8; i < a.K; i += 256) ss += sum_squares(load_x16(row + i));
#pragma unroll
            for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
            if (lane == 0) rstd_s[n] = 1.f / sqrtf(ss / a.K + a.eps);
        }
        __syncthreads();
        rstd = has_x ? rstd_s[g] : 0.f;
    }
    mma_load_x<U, NORM>(xp, gp, has_x, warp, chunks, xv, gv);
    let_dependents_launch();

    for (int parity = 0; unit < n_units; unit += gridDim.x, parity ^= 1) {
        float acc[RT][2][4];
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[r][j][i] = 0.f;
        for (int s = warp; s < steps; s += warps) {
            uint4 nwa[U][RT], nwb[U][RT], nxv[U], ngv[U];
            if (s + warps < steps) {
                mma_load_w<RT, U>(w0, w1, s + warps, chunks, nwa, nwb);
                mma_load_x<U, NORM>(xp, gp, has_x, s + warps, chunks, nxv, ngv);
            } else if (unit + gridDim.x < n_units) {  // the next unit's first step (x is the same)
                mma_unit_pointers<RT>(a, unit + gridDim.x, g, t, w0, w1);
                mma_load_w<RT, U>(w0, w1, warp, chunks, nwa, nwb);
                mma_load_x<U, NORM>(xp, gp, has_x, warp, chunks, nxv, ngv);
            }
            mma_step<RT, U, NORM>(wa, wb, xv, gv, rstd, acc);
#pragma unroll
            for (int u = 0; u < U; u++) {
                xv[u] = nxv[u];
                if (NORM) gv[u] = ngv[u];
#pragma unroll
                for (int r = 0; r < RT; r++) {
                    wa[u][r] = nwa[u][r];
                    wb[u][r] = nwb[u][r];
                }
            }
        }
        float *rp = red + parity * red_half;
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int i = 0; i < 4; i++) rp[((warp * RT + r) * 4 + i) * 32 + lane] = acc[r][0][i] + acc[r][1][i];
        __syncthreads();

        // the epilogue: thread o takes row m of the unit's outputs (consecutive threads, consecutive columns of
        // y) for row n of x
        constexpr int P = RT >= 2 ? RT / 2 : 1;
        const bool pairs = a.glu || a.rope_d;
        const int rows_out = pairs ? P * 16 : RT * 16;
        for (int o = threadIdx.x; o < rows_out * a.M; o += blockDim.x) {
            const int m = o % rows_out, n = o / rows_out, p = m >> 4, mm = m & 15;
            uint16_t *yrow = a.y + (size_t)n * a.ldy;
            const uint16_t *rrow = a.res ? a.res + (size_t)n * a.ldy : nullptr;
            if (!pairs) {
                const int row = mma_tile_base<RT>(a, unit, p) + mm;
                if (row >= a.N) continue;
                float out = round_bf16(mma_sum<RT>(rp, warps, p, mm, n));
                if (rrow) out = round_bf16(out + bf16_bits_to_float(rrow[row]));
                yrow[row] = bf16_bits(out);
                continue;
            }
            const int ra = mma_tile_base<RT>(a, unit, p) + mm, rb = mma_tile_base<RT>(a, unit, P + p) + mm;
            const float ga = round_bf16(mma_sum<RT>(rp, warps, p, mm, n));
            const float vb = round_bf16(mma_sum<RT>(rp, warps, P + p, mm, n));
            if (a.glu) {
                if (ra >= a.N / 2) continue;
                float out = round_bf16(ga / (1.f + expf(-ga)) * vb);
                if (rrow) out = round_bf16(out + bf16_bits_to_float(rrow[ra]));
                yrow[ra] = bf16_bits(out);
            } else {
                if (rb >= a.N) continue;
                if (ra < a.rope_rows) {
                    const int i = ra % a.rope_d, half = a.rope_d / 2;
                    const uint16_t *cr = a.cos + (size_t)n * a.rope_d, *sr = a.sin + (size_t)n * a.rope_d;
                    const float c0 = bf16_bits_to_float(cr[i]), s0 = bf16_bits_to_float(sr[i]);
                    const float c1 = bf16_bits_to_float(cr[i + half]), s1 = bf16_bits_to_float(sr[i + half]);
                    yrow[ra] = bf16_bits(__fadd_rn(__fmul_rn(ga, c0), -__fmul_rn(vb, s0)));
                    yrow[rb] = bf16_bits(__fadd_rn(__fmul_rn(vb, c1), __fmul_rn(ga, s1)));
                } else {
                    yrow[ra] = bf16_bits(ga);
                    yrow[rb] = bf16_bits(vb);
                }
            }
        }
    }
}

template <int RT, int U, bool NORM>
static int launch_mma(const MmaArgs &a, int warps, int pdl, cudaStream_t stream) {
    constexpr int P = RT >= 2 ? RT / 2 : 1;
    // tiles of outputs (pairs: of pairs; RoPE's halves are whole tiles, mma_supports)
    const int tiles = ((a.glu || a.rope_d ? a.N / 2 : a.N) + 15) / 16;
    const int units = a.glu || a.rope_d ? (tiles + P - 1) / P : (tiles + RT - 1) / RT;
    const size_t smem = (size_t)2 * warps * RT * 128 * sizeof(float);
    const void *kernel = (const void *)bf16_mma_kernel<RT, U, NORM>;
    int fit;
    cudaError_t e = blocks_that_fit(kernel, warps, smem, &fit);
    if (e != cudaSuccess) return (int)e;
    // as many blocks as fit, each taking the same number of units (the last ones one fewer)
    const int rounds = fit > 0 ? (units + fit - 1) / fit : 1;
    int n_units = units;
    void *args[] = {(void *)&a, (void *)&n_units};
    return launch_on(kernel, args, (units + rounds - 1) / rounds, warps, smem, pdl, stream);
}

extern "C" int flint_bf16_mma(const void *x, const void *w, void *y, int M, int N, int K, int ldx, int ldy,
                              const void *norm_w, float eps, const void *res, int glu, const void *cos,
                              const void *sin, int rope_d, int rope_rows, int tiles, int unroll, int warps, int pdl,
                              void *stream) {
    MmaArgs a = {(const uint16_t *)x, (const uint16_t *)w, (uint16_t *)y, (const uint16_t *)res,
                 (const uint16_t *)norm_w, (const uint16_t *)cos, (const uint16_t *)sin, M, N, K, ldx, ldy, eps,
                 glu, rope_d, rope_rows};
    cudaStream_t s = (cudaStream_t)stream;
    if (M < 1 || M > 8 || K % 32 || warps < 1 || warps > 8 || ((glu || rope_d) && tiles % 2)) return -1;
    const bool norm = norm_w != nullptr;
#define FLINT_CASE(RT_, U_) \
    if (tiles == RT_ && unroll == U_) \
        return norm ? launch_mma<RT_, U_, true>(a, warps, pdl, s) : launch_mma<RT_, U_, false>(a, warps, pdl, s);
    FLINT_CASE(1, 2) FLINT_CASE(1, 4) FLINT_CASE(2, 1) FLINT_CASE(2, 2) FLINT_CASE(4, 1)
#undef FLINT_CASE
    return -1;
}

// ---------------------------------------------------------------- decode attention (sm_90: thread block clusters)
// One query token per row over a static cache [Bc, Hkv, S, D], slots lo..pos of the row: the kv head's GROUP query
// heads at once. A cluster of C blocks per (row, kv head); a lane holds DL = 8 dims of one slot's key and value
// (LS = D / 8 lanes a slot, 32 / LS slots a warp), cluster step cs covers slots cs * C * SPC .. + C * SPC, block r
// the SPC of them at r * SPC, walked U cluster steps at a time with the next U's loads in flight. Each lane group
// keeps an online softmax (max m, sum l, output o, in log2 units); lane groups merge by shuffles, warps in shared
// memory, and the C blocks through distributed shared memory: block r owns slice r of the GROUP x D outputs, every
// block stores its partial of each slice into the owner's shared memory, and each owner merges and writes its
// slice. One kernel, where the split kernel of kv.py needs a second one to merge. The cache's earlier slots
// load before griddepcontrol.wait (no kernel of this step writes them); q and the step's key and value (stored
// at pos by block 0) after it.

struct AttnArgs {
    const uint16_t *q, *kn, *vn;  // bf16 [B, H, 1, D], [B, Hkv, 1, D] x2 (strided views, unit stride along D)
    uint16_t *kc, *vc, *out;      // caches bf16 [Bc, Hkv, S, D] (same strides); out bf16 [B, H, 1, D]
    const void *pos;              // int32 or int64 [B] (stride s_pos)
    int pos64;
    long long sq_b, sq_h, skn_b, skn_h, svn_b, svn_h, s_pos, sk_b, sk_h, sk_s, so_b, so_h;
    int Hkv, S, group, window;    // window > 0: slots pos - window + 1 .. pos
    float scale;                  // log2(e) / sqrt(D)
};

#define ATTN_CMAX 16  // blocks a cluster at most

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x, ~2 ulp; 2^-inf = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// the weight of a partial of max m in a merge of max M (an empty partial, m = -inf, weighs nothing)
__device__ __forceinline__ float rescale(float m, float M) { return m == -INFINITY ? 0.f : fast_exp2(m - M); }

__device__ __forceinline__ void bf16x8(uint4 v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}

// at most 128 registers with 4 query heads: a block fits beside the qkv GEMV's (which leaves 16K registers of an SM)
// and loads its keys before that one ends
template <int D, int GMAX, int U>
__global__ void __launch_bounds__(128, GMAX <= 4 ? 4 : 2) decode_attention_kernel(const AttnArgs a) {
#if __CUDA_ARCH__ >= 900
    constexpr int DL = 8, LS = D / DL, SPW = 32 / LS, WARPS = 4, SPC = WARPS * SPW;
    __shared__ float warp_m[WARPS][GMAX], warp_l[WARPS][GMAX], warp_f[WARPS][GMAX];
    __shared__ float warp_o[WARPS][GMAX][D];
    __shared__ float part_m[ATTN_CMAX][GMAX], part_l[ATTN_CMAX][GMAX];  // every block's max and sum, pushed here
    __shared__ float part_o[GMAX * D];  // every block's partial output of this block's slice: [C][GMAX * D / C]
    cg::cluster_group cluster = cg::this_cluster();
    const int C = (int)cluster.num_blocks(), rank = (int)cluster.block_rank();
    // every block of the cluster must have started before one writes to another's shared memory: arrive now, wait
    // just before those stores
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    const int b = blockIdx.y / a.Hkv, kvh = blockIdx.y % a.Hkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, j = lane / LS, dl = lane % LS;
    const long long pos = a.pos64 ? reinterpret_cast<const long long *>(a.pos)[b * a.s_pos]
                                  : (long long)reinterpret_cast<const int *>(a.pos)[b * a.s_pos];
    const long long lo = a.window > 0 ? max(pos - a.window + 1, 0LL) : 0LL;
    const long long stride = (long long)C * SPC;  // slots a cluster step
    const long long mine = rank * SPC + warp * SPW + j;  // this lane's slot in a cluster step
    const int first = (int)(lo / stride), last = (int)(pos / stride);
    const long long head = b * a.sk_b + kvh * a.sk_h + dl * DL;
    const uint4 *kc = reinterpret_cast<const uint4 *>(a.kc + head), *vc = reinterpret_cast<const uint4 *>(a.vc + head);
    const long long step_words = a.sk_s / 8;  // 16-byte words a slot

    uint4 kb[U], vb[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const long long slot = (first + u) * stride + mine;
        const bool old = slot >= lo && slot < pos;  // slot pos is this step's: from kn, vn below
        kb[u] = old ? kc[slot * step_words] : make_uint4(0, 0, 0, 0);
        vb[u] = old ? vc[slot * step_words] : make_uint4(0, 0, 0, 0);
    }
    wait_for_producer();
    float q[GMAX][DL];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        uint4 w = make_uint4(0, 0, 0, 0);
        if (g < a.group)
            w = *reinterpret_cast<const uint4 *>(a.q + b * a.sq_b + (kvh * a.group + g) * a.sq_h + dl * DL);
        bf16x8(w, q[g]);
#pragma unroll
        for (int i = 0; i < DL; i++) q[g][i] *= a.scale;
    }
    const uint4 kn = *reinterpret_cast<const uint4 *>(a.kn + b * a.skn_b + kvh * a.skn_h + dl * DL);
    const uint4 vn = *reinterpret_cast<const uint4 *>(a.vn + b * a.svn_b + kvh * a.svn_h + dl * DL);
    if (rank == 0 && warp == 0 && j == 0) {  // LS lanes: the step's key and value into slot pos
        const_cast<uint4 *>(kc)[pos * step_words] = kn;
        const_cast<uint4 *>(vc)[pos * step_words] = vn;
    }
    let_dependents_launch();

    float m[GMAX], l[GMAX], o[GMAX][DL];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < DL; i++) o[g][i] = 0.f;
    }
    for (int cs0 = first; cs0 <= last; cs0 += U) {
        uint4 nk[U], nv[U];
#pragma unroll
        for (int u = 0; u < U; u++) {  // the next U cluster steps' loads in flight during this one's math
            const long long slot = (cs0 + U + u) * stride + mine;
            const bool old = cs0 + U + u <= last && slot >= lo && slot < pos;
            nk[u] = old ? kc[slot * step_words] : make_uint4(0, 0, 0, 0);
            nv[u] = old ? vc[slot * step_words] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (cs0 + u > last) break;  // the same for the whole cluster: the shuffles below see whole warps
            const long long slot = (cs0 + u) * stride + mine;
            float kf[DL], vf[DL];
            bf16x8(slot == pos ? kn : kb[u], kf);
            bf16x8(slot == pos ? vn : vb[u], vf);
            float s[GMAX];
#pragma unroll
            for (int g = 0; g < GMAX; g++) {
                s[g] = 0.f;
#pragma unroll
                for (int i = 0; i < DL; i++) s[g] = fmaf(q[g][i], kf[i], s[g]);
#pragma unroll
                for (int off = LS / 2; off; off >>= 1) s[g] += __shfl_xor_sync(0xFFFFFFFFu, s[g], off);
            }
            if (slot >= lo && slot <= pos) {
#pragma unroll
                for (int g = 0; g < GMAX; g++) {
                    const float M = fmaxf(m[g], s[g]), keep = rescale(m[g], M), p = fast_exp2(s[g] - M);
                    l[g] = fmaf(l[g], keep, p);
#pragma unroll
                    for (int i = 0; i < DL; i++) o[g][i] = fmaf(o[g][i], keep, p * vf[i]);
                    m[g] = M;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            kb[u] = nk[u];
            vb[u] = nv[u];
        }
    }
    // the warp's lane groups (lanes j * LS + dl hold dims dl * DL .. of slot group j)
#pragma unroll
    for (int off = LS; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
            const float m2 = __shfl_xor_sync(0xFFFFFFFFu, m[g], off), l2 = __shfl_xor_sync(0xFFFFFFFFu, l[g], off);
            const float M = fmaxf(m[g], m2), w1 = rescale(m[g], M), w2 = rescale(m2, M);
            l[g] = l[g] * w1 + l2 * w2;
#pragma unroll
            for (int i = 0; i < DL; i++) o[g][i] = o[g][i] * w1 + __shfl_xor_sync(0xFFFFFFFFu, o[g][i], off) * w2;
            m[g] = M;
        }
    }
    if (j == 0) {
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
#pragma unroll
            for (int i = 0; i < DL; i++) warp_o[warp][g][dl * DL + i] = o[g][i];
            if (dl == 0) {
                warp_m[warp][g] = m[g];
                warp_l[warp][g] = l[g];
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < GMAX) {  // the block's max and sum of query head g, and each warp's weight in them
        const int g = threadIdx.x;
        float M = -INFINITY, sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, warp_m[w][g]);
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            warp_f[w][g] = rescale(warp_m[w][g], M);
            sum += warp_f[w][g] * warp_l[w][g];
        }
        warp_m[0][g] = M;  // read below only as the block's max, after the barrier
        warp_l[0][g] = sum;
    }
    __syncthreads();
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    // the block's partial, each slice into its owner's shared memory (these stores do not wait for an answer)
    const int slice = GMAX * D / C;
    if (threadIdx.x < C * GMAX) {
        const int owner = threadIdx.x / GMAX, g = threadIdx.x % GMAX;
        cluster.map_shared_rank(&part_m[0][0], owner)[rank * GMAX + g] = warp_m[0][g];
        cluster.map_shared_rank(&part_l[0][0], owner)[rank * GMAX + g] = warp_l[0][g];
    }
    for (int e = threadIdx.x; e < GMAX * D; e += blockDim.x) {
        const int g = e / D, d = e % D, owner = e / slice;
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) acc = fmaf(warp_f[w][g], warp_o[w][g][d], acc);
        cluster.map_shared_rank(part_o, owner)[rank * slice + e % slice] = acc;
    }
    cluster.sync();  // every block's pieces are where they belong; from here each block reads its own memory only
    for (int i = threadIdx.x; i < slice; i += blockDim.x) {
        const int e = rank * slice + i, g = e / D, d = e % D;
        if (g >= a.group) break;  // g grows with i
        float M = -INFINITY;
        for (int r = 0; r < C; r++) M = fmaxf(M, part_m[r][g]);
        float acc = 0.f, sum = 0.f;
        for (int r = 0; r < C; r++) {
            const float f = rescale(part_m[r][g], M);
            acc = fmaf(f, part_o[r * slice + i], acc);
            sum = fmaf(f, part_l[r][g], sum);
        }
        a.out[b * a.so_b + (kvh * a.group + g) * a.so_h + d] = bf16_bits(acc / sum);
    }
#endif
}

template <int D, int GMAX, int U>
static int launch_attention(const AttnArgs &a, int B, int C, int pdl, cudaStream_t stream) {
    const void *kernel = (const void *)decode_attention_kernel<D, GMAX, U>;
    if (C > ATTN_CMAX || C & (C - 1)) return -1;  // a power of two: slices of GMAX * D / C outputs
    cudaError_t e;
    if (C > 8 && (e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1)) != cudaSuccess)
        return (int)e;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(C, B * a.Hkv);
    cfg.blockDim = dim3(128);
    cfg.stream = stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = C;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 2 : 1;
    AttnArgs args_copy = a;
    void *args[] = {&args_copy};
    return (int)cudaLaunchKernelExC(&cfg, kernel, args);
}

// the largest cluster (16, else 8) that the device can run of the D = 128, GMAX = 8 instance (the most registers)
extern "C" int flint_attention_max_cluster() {
    const void *kernel = (const void *)decode_attention_kernel<128, 8, 2>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) return 8;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(16, 1);
    cfg.blockDim = dim3(128);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 16;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters < 1) {
        cudaGetLastError();
        return 8;
    }
    return 16;
}

// strides: q (b, h), kn (b, h), vn (b, h), pos, cache (b, h, s), out (b, h): 12 values, in elements
extern "C" int flint_decode_attention(const void *q, const void *kn, const void *vn, void *kc, void *vc,
                                      const void *pos, int pos64, void *out, const long long *strides, int B,
                                      int Hkv, int S, int D, int group, int window, int cluster, int pdl,
                                      void *stream) {
    AttnArgs a = {(const uint16_t *)q, (const uint16_t *)kn, (const uint16_t *)vn, (uint16_t *)kc, (uint16_t *)vc,
                  (uint16_t *)out, pos, pos64, strides[0], strides[1], strides[2], strides[3], strides[4],
                  strides[5], strides[6], strides[7], strides[8], strides[9], strides[10], strides[11], Hkv, S,
                  group, window, 1.4426950408889634f / sqrtf((float)D)};
    cudaStream_t s = (cudaStream_t)stream;
    const int gmax = group <= 4 ? 4 : group <= 8 ? 8 : 0;
    if (D == 64 && gmax == 4) return launch_attention<64, 4, 2>(a, B, cluster, pdl, s);
    if (D == 64 && gmax == 8) return launch_attention<64, 8, 2>(a, B, cluster, pdl, s);
    if (D == 128 && gmax == 4) return launch_attention<128, 4, 2>(a, B, cluster, pdl, s);
    if (D == 128 && gmax == 8) return launch_attention<128, 8, 2>(a, B, cluster, pdl, s);
    return -1;
}

extern "C" const char *flint_error_string(int e) {
    return e < 0 ? "no such kernel instance" : cudaGetErrorString((cudaError_t)e);
}
"""

# the (rows, unroll) pairs compiled above: a warp's rows of W, and column steps of 1024 loaded at once
INSTANCES = ((2, 1), (2, 2), (2, 4), (4, 1))  # K % 1024 != 0: (2, 1) only
GROUP_SIZES = (32, 64, 128)
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flint")
_error: Optional[str] = None


def _nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _compile_command(nvcc: str, arch: str, src: str, out: str) -> list[str]:
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            src, "-o", out]


def _build(arch: str) -> str:
    """Compile CUDA_SOURCE for sm_<arch> (once per source, nvcc and architecture) into CACHE_DIR; the .so's path."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("no nvcc (set CUDA_HOME)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = CUDA_SOURCE + " ".join(_compile_command(nvcc, arch, "", "")) + version
    path = os.path.join(CACHE_DIR, f"cuda_kernels_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(CACHE_DIR, exist_ok=True)
        print("flint: building the CUDA kernels (once, ~10 s) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "cuda_kernels.cu"), os.path.join(tmp, "cuda_kernels.so")
            with open(src, "w") as f:
                f.write(CUDA_SOURCE)
            done = subprocess.run(_compile_command(nvcc, arch, src, out), capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"nvcc failed:\n{done.stderr[-4000:]}")
            os.replace(out, path)  # atomic: a concurrent process never loads a half-written file
    return path


_builds: dict[str, concurrent.futures.Future] = {}  # arch -> the path of its .so, built once a process
_builds_lock = threading.Lock()


def _build_in_background(arch: str) -> concurrent.futures.Future:
    with _builds_lock:
        if arch not in _builds:
            future = concurrent.futures.Future()

            def build():
                try:
                    future.set_result(_build(arch))
                except BaseException as e:  # kept for whoever waits: available() turns it into build_error()
                    future.set_exception(e)

            threading.Thread(target=build, name=f"flint-nvcc-sm{arch}", daemon=True).start()
            _builds[arch] = future
        return _builds[arch]


def _arch(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}{minor}"


def _wanted(device: torch.device) -> bool:
    """What available() and buildable() both ask first: FLINT_CUDA_KERNELS not 0, a CUDA GPU of compute capability
    8.0 or later, no build failed so far."""
    return (os.environ.get("FLINT_CUDA_KERNELS", "1") != "0" and device.type == "cuda" and _error is None
            and torch.cuda.is_available() and torch.cuda.get_device_capability(_device_index(device)) >= (8, 0))


def buildable(device) -> bool:
    """Whether available() would build the kernels for device (_wanted and nvcc found), known without waiting for
    nvcc: gemv's picks file is keyed by it, so a first tuning at one row (bf16 decode at batch 1, which has no kernel
    here) does not wait for the build."""
    return _wanted(torch.device(device)) and _nvcc() is not None


def prebuild(device) -> None:
    """Start building the kernels for device in a background thread where buildable(device): a cold machine's ~10 s
    of nvcc then runs while the weights load and torch.compile works (H200, llama-3-8b bf16 from fresh caches:
    compile_s 17.4-18.2 against 21.6-21.9 s with the build in the first request). available() and the kernels wait
    for it; a failure shows there, as before."""
    if buildable(device):
        _build_in_background(_arch(_device_index(torch.device(device))))


def wait_for_builds() -> None:
    """Returns when no build started by prebuild() is still running (bench.py: no timing with nvcc beside it). A
    failure stays where it was, for available() to report."""
    for future in list(_builds.values()):
        future.exception()


@functools.cache
def _library(device_index: int):
    lib = ctypes.CDLL(_build_in_background(_arch(device_index)).result())
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.flint_int4_gemv.argtypes = [p, p, p, p, i, i, i, p, f, p, i, p, p, i, i, i, i, i, i, p]
    lib.flint_int4_gemv.restype = i
    lib.flint_bf16_mma.argtypes = [p, p, p, i, i, i, i, i, p, f, p, i, p, p, i, i, i, i, i, i, p]
    lib.flint_bf16_mma.restype = i
    lib.flint_decode_attention.argtypes = [p, p, p, p, p, p, i, p, p, i, i, i, i, i, i, i, i, p]
    lib.flint_decode_attention.restype = i
    lib.flint_attention_max_cluster.argtypes = []
    lib.flint_attention_max_cluster.restype = i
    lib.flint_error_string.argtypes = [i]
    lib.flint_error_string.restype = ctypes.c_char_p
    return lib


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def available(device) -> bool:
    """Whether int4_gemv runs on this device: a CUDA GPU of compute capability >= 8.0, nvcc (built at the first
    call, which takes ~30 s; a failure is kept, see build_error()), FLINT_CUDA_KERNELS not 0."""
    global _error
    device = torch.device(device)
    if not _wanted(device):
        return False
    try:
        _library(_device_index(device))
    except (OSError, RuntimeError) as e:
        _error = str(e)
        return False
    return True


def build_error() -> Optional[str]:
    return _error


def supports(N: int, K: int, group_size: int, glu: bool = False, rope_d: int = 0) -> bool:
    """Shapes int4_gemv takes: K a multiple of 32 (16 bytes a lane) and of G (32, 64 or 128), N even for the
    pairs of glu and RoPE (rows, unroll other than (2, 1) also need K % 1024 == 0)."""
    return (K % 32 == 0 and group_size in GROUP_SIZES and K % group_size == 0
            and (not (glu or rope_d) or N % 2 == 0))


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def int4_gemv(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, y: torch.Tensor, group_size: int, rows: int,
              unroll: int, warps: int, pdl: bool, norm=None, residual=None, glu: bool = False, rope=None) -> None:
    """y bf16 [1, N] (or [1, N/2] with glu) = x2 bf16 [1, K] @ W^T for gemv.py's int4 layout: words int32 [N, K/8]
    (the packed codes), sz int32 [N, K/G] (scale, zero). norm (weight bf16 [K], eps), residual (bf16 as y),
    glu, rope (cos, sin bf16 [1, D], rope_rows) as gemv.int4_linear takes them. All contiguous on one GPU."""
    N, K = words.shape[0], words.shape[1] * 8
    if (rows, unroll) not in INSTANCES or K % 1024 and (rows, unroll) != (2, 1) or group_size not in GROUP_SIZES:
        raise ValueError(f"int4_gemv: no kernel for rows={rows}, unroll={unroll}, K={K}, G={group_size}")
    norm_w, eps = norm if norm is not None else (None, 0.0)
    cos, sin, rope_rows = rope if rope is not None else (None, None, 0)
    rope_d = 0 if cos is None else cos.shape[-1]
    lib = _library(_device_index(x2.device))
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    err = lib.flint_int4_gemv(x2.data_ptr(), words.data_ptr(), sz.data_ptr(), y.data_ptr(), N, K, group_size,
                              _ptr(norm_w), float(eps), _ptr(residual), int(glu), _ptr(cos), _ptr(sin), rope_d,
                              int(rope_rows), rows, unroll, warps, int(pdl), stream)
    if err:
        raise RuntimeError(f"int4_gemv: {lib.flint_error_string(err).decode()}")


# ---------------------------------------------------------------- bf16 GEMV at 1..8 rows (tensor cores)

MMA_INSTANCES = ((1, 2), (1, 4), (2, 1), (2, 2), (4, 1))  # (tiles of 16 rows of W a block, chunks of 32 columns a step)
MMA_MAX_ROWS = 8  # rows of x: the mma's 8 columns
MMA_MAX_WARPS = 8


def mma_supports(M: int, N: int, K: int, glu: bool = False, rope_d: int = 0) -> bool:
    """Shapes bf16_mma takes: 1..8 rows of x, K a multiple of 32 (16 bytes a lane), N even with glu, a head dim
    that is a multiple of 32 with RoPE (a tile of 16 rows inside one half of a head)."""
    return (1 <= M <= MMA_MAX_ROWS and K % 32 == 0 and N > 0 and (not glu or N % 2 == 0)
            and (not rope_d or (rope_d % 32 == 0 and N % rope_d == 0)))


def bf16_mma(x2: torch.Tensor, w: torch.Tensor, y: torch.Tensor, tiles: int, unroll: int, warps: int, pdl: bool,
             norm=None, residual=None, glu: bool = False, rope=None) -> None:
    """y bf16 [M, N] (or [M, N/2] with glu; contiguous) = x2 bf16 [M, K] (rows 16-byte aligned) @ w bf16 [N, K]^T
    (contiguous) for M <= 8 on tensor cores. norm (weight bf16 [K], eps), residual (bf16 as y), glu, rope (cos,
    sin bf16 [M, D], rope_rows) as gemv.bf16_linear takes them; glu and rope need an even `tiles`."""
    M, K = x2.shape
    N = w.shape[0]
    norm_w, eps = norm if norm is not None else (None, 0.0)
    cos, sin, rope_rows = rope if rope is not None else (None, None, 0)
    rope_d = 0 if cos is None else cos.shape[-1]
    if ((tiles, unroll) not in MMA_INSTANCES or not 1 <= warps <= MMA_MAX_WARPS or not mma_supports(M, N, K, glu, rope_d)
            or (glu or rope_d) and tiles % 2):
        raise ValueError(f"bf16_mma: no kernel for tiles={tiles}, unroll={unroll}, warps={warps}, M={M}, N={N}, "
                         f"K={K}, glu={glu}, rope_d={rope_d}")
    lib = _library(_device_index(x2.device))
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    err = lib.flint_bf16_mma(x2.data_ptr(), w.data_ptr(), y.data_ptr(), M, N, K, x2.stride(0), y.stride(0),
                             _ptr(norm_w), float(eps), _ptr(residual), int(glu), _ptr(cos), _ptr(sin), rope_d,
                             int(rope_rows), tiles, unroll, warps, int(pdl), stream)
    if err:
        raise RuntimeError(f"bf16_mma: {lib.flint_error_string(err).decode()}")


# ---------------------------------------------------------------- decode attention

ATTENTION_HEAD_DIMS = (64, 128)
ATTENTION_MAX_GROUP = 8  # query heads a kv head


def attention_available(device) -> bool:
    """Whether decode_attention runs on this device: available() and compute capability 9.0 or later (thread block
    clusters). kv.py uses it where a cache asks for it (see kv.use_cuda_attention)."""
    device = torch.device(device)
    if not available(device):
        return False
    return torch.cuda.get_device_capability(_device_index(device)) >= (9, 0)


def attention_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, pos: torch.Tensor) -> bool:
    """Shapes and layouts decode_attention takes: bf16, head dim 64 or 128, at most 8 query heads a kv head, unit
    stride along the head dim and 16-byte aligned rows, pos int32 or int64."""
    H, Hkv, D = q.shape[1], k_cache.shape[1], q.shape[-1]
    tensors = (q, k, v, k_cache, v_cache)
    return (D in ATTENTION_HEAD_DIMS and H % Hkv == 0 and H // Hkv <= ATTENTION_MAX_GROUP
            and all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                    and all(st % 8 == 0 for st in t.stride()[:-1]) for t in tensors)
            and k_cache.stride() == v_cache.stride() and pos.dtype in (torch.int32, torch.int64))


@functools.cache
def _max_cluster(device_index: int) -> int:
    return _library(device_index).flint_attention_max_cluster()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: torch.Tensor, window: int, out: torch.Tensor, pdl: bool,
                     cluster: Optional[int] = None) -> None:
    """kv.decode_attention's work in one kernel: out [B, H, 1, D] = softmax(q k^T / sqrt(D)) v over the cache's
    slots lo..pos[b] of each row b, storing k, v [B, Hkv, 1, D] at slot pos[b] first. Shapes as attention_supports
    takes them; out contiguous. cluster: blocks a (row, kv head), a power of two up to 16 (tests; default: enough
    to fill the GPU)."""
    B, H, _, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    index = _device_index(q.device)
    if cluster is None:  # enough blocks to fill the GPU (one an SM at batch 1), no more than the slots need
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        slots_a_block = 4 * 32 // (D // 8)  # the kernel's SPC: 4 warps of 32 / (D / 8) slots
        cluster = 1
        while cluster < _max_cluster(index) and cluster * B * Hkv < sms and cluster * slots_a_block < S:
            cluster *= 2
    strides = (ctypes.c_longlong * 12)(q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                       pos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                       out.stride(0), out.stride(1))
    lib = _library(index)
    err = lib.flint_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                     pos.data_ptr(), int(pos.dtype == torch.int64), out.data_ptr(), strides, B, Hkv, S,
                                     D, H // Hkv, int(window), cluster, int(pdl),
                                     torch.cuda.current_stream(q.device).cuda_stream)
    if err:
        raise RuntimeError(f"decode_attention: {lib.flint_error_string(err).decode()}")
