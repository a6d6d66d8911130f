"""Triton GEMV kernels for decode: y = x @ W^T with few rows of x (M <= 64), weights read once from memory.

    y = int8_linear(x2, w, scales)                       # x2 bf16 [M, K], w int8 [N, K], scales bf16 [N]
    y = int4_linear(x2, packed, scales_zeros, group)     # packed uint8 [N, K/2], scales_zeros bf16 [N, K/G, 2]
    y = bf16_linear(x2, w)                               # w bf16 [N, K]
    if gemv.available(x2): ...                           # a CUDA tensor (or device) and Triton importable
    gemv.use_for_linears(model)                          # bf16 nn.Linear -> gemv.Linear, as a compiled CUDA
                                                         # Engine does (FLINT_GEMV=0: off)

Each is a torch custom op (torch.ops.flint.*): torch.compile(fullgraph=True) sees one opaque call and a CUDA
graph captures its launch. They return bf16 [M, N] with fp32 accumulation.

Why: at batch 1 a linear layer is a matrix-vector product, bound by the bytes of W it reads (H200: ~4.2 TB/s
copy bandwidth). cuBLAS gets close for bf16, but the quantized paths did not: int8 ran F.linear on a bf16 copy
of W, and tinygemm (aten._weight_int4pack_mm) reaches ~0.38 of copy bandwidth. Here every program owns
BLOCK_N rows of W, walks K in tiles of BLOCK_K columns, and dequantizes in registers.

Layouts (as quantize.py stores them, nothing repacked):
  int8   w int8 [N, K] row-major, w_real = q * scale[n].
  int4   packed uint8 [N, K/2], quantize.pack_nibbles: code 2i in the low nibble of byte i, 2i+1 in the high
         one; scales_zeros bf16 [N, K/G, 2] = (scale, zero) per row and group; w_real = (q - 8) * scale + zero.
         The kernel reads packed as int32 words [N, K/8] (code 8w+j in bits 4j..4j+3, little-endian) and
         scales_zeros as int32 [N, K/G] (scale in the low half, zero in the high half: one load for both).

Dequantizing without int->float conversion instructions (16 per clock per SM on sm_80/sm_90, an eighth of
the FP32 FMA rate, too slow for the 18-36 weights per clock per SM that 4.2 TB/s over 132 SMs brings): OR-ing
a small integer into the mantissa of a float constant gives that float plus the integer, exactly.
  int8   (q + 0x4B000080) as fp32 bits = 2^23 + 128 + q, minus (2^23 + 128) = q. The same bits with one
         byte permute (PTX prmt) a weight: a word of four codes XORed with 0x80808080 (q + 128, unsigned),
         each byte moved under the constant byte 0x4B (fma_prmt, int8_fma).
  int4   a nibble at bits 16..19, | 0x43000000, reads as 128 + q (fp32); at bits 12..15, | 0x45000000, as
         2048 + q. Four shifts of a word (<< 16, << 8, >> 8, >> 16, and the word itself) put each of its
         eight nibbles at one of the two places, so per weight the work is half a shift, one LOP3 (AND and
         OR in one instruction) and one FMA. Per group g of G columns, with c_k = 128 or 2048:
         sum_k w_k x_k = s * (sum_k (c_k + q_k) x_k - sum_k c_k x_k) + (z - 8 s) * sum_k x_k; scales
         apply once per group. (2048 costs ~11 of fp32's 24 bits to the cancellation; the output is bf16.)

Kernels (a config names one; the first call for a shape times the candidates, see _pick):
  fma    one program = one row m of x and BLOCK_N rows of W (grid M * N/BLOCK_N, programs of one weight
         tile adjacent so that rows m > 0 find it in L2). Products in fp32 FMAs, summed at the end (bf16,
         int8) or per group (int4). For M = 1 (and a few rows). A config's optional sixth and seventh
         numbers: K split over SPLIT programs, tiles loaded that many steps ahead into registers.
         fma_prmt is fma with int8 made fp32 by prmt through inline PTX (pack=4: four codes a register).
         int8_fma reads int8 W as int32 words [N, K/4] (a [BLOCK_N, BLOCK_K/4] tile, four fp32 partial
         sums a word) and takes the next tiles' words ahead as int4_fma does.
         int8_h2 and int4_h2 are int8_fma and int4_fma with the products in packed fp16 pairs (fp16x2 FMAs,
         two weights an instruction): x read as bf16 pairs and made fp16, codes made exact fp16 pairs
         1024 + q by a byte permute (int8) or one LOP3 (int4, two nibbles a word at a time) and scaled to
         q/64 or (q - 8)/16 by one fp16x2 FMA; each word keeps a pair of fp16 sums (int8: over the program's
         K; int4: each group's sums scaled into the pair with one more FMA), summed in fp32 at the end. About
         40% (int8) and 28% (int4) fewer instructions a weight; the error stays below bf16's rounding of y
         (~1e-3 of max |y|). x must be an fp16 number (|x| < 65504), as decode activations are; tests cover
         activations of a few thousand. FLINT_GEMV_FP16=0 leaves them out of the candidates (fp32 products only).
         int4_fma takes one group a step on a [BLOCK_N, G/8 words] tile (a thread holds a few rows of the
         same words, so the x it loads serves all of them), loads the words of the group one or two ahead
         (its config's fifth number) before this one's math, and splits K over SPLIT programs (the third):
         llama-3-8b's N = 4096 with 32 or 64 rows a program is too few one-warp programs to keep enough
         loads in flight. The SPLIT
         partial sums meet in an fp32 workspace; the last program of a row block to finish (an atomic
         counter, left at 0 for the next call) adds them and stores y.
  mma    int8_mma / int4_mma: tensor cores through inline PTX mma.sync.m16n8k16 (fp16 in, fp32 sums), one warp a
         program of BLOCK_N / 16 tiles of 16 rows of W; the rows of x (1..8) are the mma's 8 columns, so W is read
         once for up to 8 rows. A lane feeds the mma with the codes it loaded itself: which column of W a k-slot
         of the mma stands for is free as long as A and B agree, so no shuffles. Codes become fp16 with one LOP3
         per pair (int8: 1152 + q, int4: 1024 + q or 64 + q by the nibble's place); the offsets come off with
         one more mma a word whose A is constant (int4 per group: scale * (C - offsets . x) + zero * sum x).
         At one row they lose to int8_h2 / int4_h2 on every llama-3-8b shape (5-30%, latency-bound like them,
         fewer instructions or not), so they are candidates from 2 to 8 rows, where they beat the dot kernels
         (int8 1.05-1.26x, int4 1.3-3.1x on the H200 at 8 rows). bf16_mma feeds bf16 W to a bf16 mma as loaded
         (no conversion, no offsets): on the H200 it matches cuBLAS at 8 rows and beats cuBLAS and the fma/dot
         kernels on some shapes at 2 and 4 (gate_up 56.4 against 61.4 us at 2 rows); a candidate from 2 rows.
  dot    one program = all M rows (padded to a power of two >= 16) and BLOCK_N rows of W, tensor cores via
         tl.dot: reads W once for any M; a sixth number splits K as in fma (N = 4096 in blocks of 64 rows
         is only 64 programs for 132 SMs). The int4 one takes a group per step, even and odd columns of x
         against the low and high nibbles (two dots, no interleave), bf16 128 + q as the weights.
  int4_cu  not Triton: cuda_kernels.int4_gemv, a CUDA C++ kernel built with nvcc at first use (one row of x; a warp
         streams whole rows of W, 512 contiguous bytes a row an instruction, x staged once a block in shared
         memory; the norm, residual, GLU and RoPE fusions as the h2 kernels). Config (kernel, rows a warp,
         column steps of 1024 a load, warps a block, 1). On the H200 it beats int4_h2 on every llama-3-8b int4
         g128 shape (qkv 6.6 against 9.1 us, o_proj 4.3 / 6.7, gate_up 17.4 / 27.3, down 9.7 / 13.9): int4 decode
         ~616-629 against ~483 tok/s. A candidate at one row where cuda_kernels.available() (nvcc found).
Rows of W past N are clamped to N - 1 (loads stay in bounds, the store is masked), so N need not divide by
BLOCK_N; K need not divide by BLOCK_K (masked tail; int4 needs K % G == 0, as Int4Linear pads).

SwiGLU in the epilogue (glu=True, model.FeedForward's gate_up_proj, W = [gate; up] [2F, K]): the ops return
SiLU(gate) * up [M, F] instead of [M, 2F], so a decode step runs no separate SwiGLU kernel. The fma, h2 and
mma kernels give each program gate rows j0.. and the up rows F + j0.. of the same outputs (mma: rows g and
g + 8 of a tile), add up their sums as usual and pair them as they store; dot and dequant run silu_mul's
kernel after. The tuner also times every kernel as "kernel+silu" (plain, then silu_mul): on the H200 at one
row the int8_h2 gate_up with the epilogue costs 0.2 us more than without, the bf16 fma one 2.7 us more (the
separate kernel ~1.4 us; the epilogue takes it from 72 to 74 registers, 7 to 6 programs an SM), so bf16 keeps
the separate kernel and int8 fuses (decode: SmolLM2 preset +5.9%,
llama-3-8b int8 +1.3%, bf16 +0.1%; BENCHMARKS.md). FLINT_GEMV_GLU=0: model.py's own SiLU(gate) * up.
RMSNorm in the prologue and the residual add in the epilogue (norm_weight, eps, residual; model.linear asks
gemv.Linear and quantize.py's linears for them at one row, fusable()): a program of the fma and h2 kernels reads
its row of x whole once after PDL's wait for the rms (one load, a single round trip), then normalizes each x
tile as it loads it, rounded as model.RMSNorm rounds ((x * rstd) to bf16, times the weight, to bf16; the h2
kernels a bf16 pair in 6 PTX instructions, sm_90's bf16x2 multiply); it loads the residual of its outputs right
after the wait and adds it as it stores. A llama block's decode step is then qkv, attention (two kernels),
o_proj, gate_up, down_proj: no norm, add or SwiGLU kernels (RoPE stays, one inductor kernel). On the H200:
int8 +2.6%, bf16 +1.0% with the residual add only (BF16_NORM_MAX_K), SmolLM2 preset +6.4%. The other kernels
(dot, mma, cuBLAS) get the norm and the add as plain ops. FLINT_GEMV_FUSE=0: model.py's own norms and adds.
At 2..8 rows a bf16 Linear hands the op the residual add where the tuner picked a kernel that has it (Linear.fuses_rows,
set by tune_linears from the picks, see rows_fusions(); the engine tunes a decode shape before tracing it): else
the add stays outside, where inductor fuses it into the next norm's kernel.
RoPE in the q/k/v matmul's epilogue (rope_cos, rope_sin [M, D], rope_rows; FLINT_GEMV_ROPE=0 turns it off): a
program's BLOCK_N rows are rows i.. and i + D/2.. of one head (BLOCK_N dividing D), rotated as they are stored
(the first rope_rows outputs: q and k; v as is); otherwise the linears rotate after the kernel. On the H200:
int8 +2.1%, bf16 +0.6%, SmolLM2 preset +1.1%.
Compiled for sm_90 by Triton 3.6 (the H200's; ptxas SASS counted over the inner loop, pointers and strides
16-byte aligned as a launch specializes them) the fma loops issue ~3.5-4.1 (bf16), ~4.9-5.3 (int8 fma),
~4.0-4.5 (fma_prmt), ~3.9-4.7 (int8_fma) and ~3.4-3.9 (int4 at G = 128; 8.4-9.8 before the int4 rewrite)
instructions per weight, against 4 (int4), 8 (int8) and 16 (bf16) per weight at which 4.2 TB/s over 132
SMs would saturate their issue; int8_h2 issues ~2.4-2.8 and int4_h2 ~2.5-2.9. On the H200 (graph-timed,
bench.py gemv) int8 reads 0.77 (qkv), 0.66 (o_proj), 0.98 (gate_up), 0.87 (down_proj) and 1.06 (lm head) of
copy bandwidth (int8_h2; int8_fma 0.71/0.63/0.93/0.82/1.01), int4 0.40/0.32/0.54/0.55 (tinygemm
0.33/0.31/0.44/0.39), where the bf16 fma reads 0.92, 0.83, 1.04, 0.95 and 1.08; bench.py's read ceiling (a
kernel that only reads the same bytes) is 0.93/0.85/1.05/1.02 for the int8 bytes and 0.80/0.69/1.02/0.96 for
the int4 ones: int4 is bound by instructions and loads in flight, the small int8 shapes by a program's serial
round trips to memory.

Candidates: M = 1 the fma configs (and one dot; int4: the int4_cu ones where they build), 2..4 rows both and the mma
kernels (int8_mma, int4_mma, bf16_mma), 5..8 dot and mma (bf16 at 2..8 also cuda_kernels' tensor-core GEMV,
"bf16_cu", where nvcc builds it: on the H200 at 8 rows it wins o_proj, 10.7-11.1 against cuBLAS's 12.3-12.4 us,
qkv within +-7% of cuBLAS, gate_up, down and the head 1-12% slower), 9..16 dot, 17..64 (continuous batching's decode batches)
dot timed against "dequant": dequantize to bf16 (int4 with a Triton kernel) and F.linear, which is also what every
M > 64 (prefill, compute-bound) gets. For bf16 cuBLAS (F.linear) is a candidate at every M > 1: it wins some shapes.
Without Triton (or on CPU without the interpreter) the ops compute the same thing with torch. The first call for a
(shape, row bucket) compiles the candidates all at once in threads (compile_candidates), then times them on the GPU
in a CUDA graph of back-to-back calls over weight copies larger than L2, as a decode step runs them
(FLINT_GEMV_TUNE=bench times one call at a time with do_bench instead, FLINT_GEMV_TUNE=0 takes the first candidate
untimed, FLINT_GEMV_PICKS pins configs per shape). The picks persist in ~/.cache/flint/gemv_picks.json per GPU,
torch, Triton and gemv.py and cuda_kernels.py version, so only a machine's first run pays the timing
(FLINT_GEMV_CACHE: another file, 0: tune in every process). Inside gemv.no_tuning() (the engine's prefills) new
shapes run their default config untimed and stay untuned. tuning_log() tells what was chosen and measured (picks
taken from the file have no timings). FLINT_GEMV_MMA=0 leaves the mma kernels out.
"""
import contextlib
import functools
import os
import threading
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

MAX_M = 64  # rows the kernels take (17..64: decode batches, dot kernels timed against dequantize + F.linear)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def enabled() -> bool:
    """False when FLINT_GEMV=0 is set: every caller then keeps the kernels it used before gemv."""
    return os.environ.get("FLINT_GEMV", "1") != "0"


def glu_enabled() -> bool:
    """Whether the linears offer SwiGLU in their epilogue (fuses_glu); FLINT_GEMV_GLU=0: model.py's separate
    SiLU(gate) * up instead."""
    return os.environ.get("FLINT_GEMV_GLU", "1") != "0"


def available(x) -> bool:
    """Whether the Triton kernels run on the device of x (a tensor or a device): CUDA (or any device under
    the interpreter, for tests) and triton imports."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    return (device.type == "cuda" or _interpret()) and _have_triton()


# ---------------------------------------------------------------- kernels (built on first use)

@functools.cache
def _kernels():
    """The @triton.jit functions. Built lazily: importing gemv needs no Triton, and a test can set
    TRITON_INTERPRET=1 before this runs."""
    import triton
    import triton.language as tl

    @triton.jit
    def silu_up(g, u, ty):
        # SwiGLU's SiLU(gate) * up from fp32 sums, as the unfused path computes it: gate and up rounded to the
        # output dtype first (they were stored), the product in fp32, rounded once
        g = g.to(ty).to(tl.float32)
        return (g * tl.sigmoid(g) * u.to(ty).to(tl.float32)).to(ty)

    @triton.jit
    def store_rows(y, y_ptr, m, N, rn, stride_ym, GLU: tl.constexpr, RES: tl.constexpr = False, r=None,
                   ROPE_D: tl.constexpr = 0, cos=None, sin=None, rope_rows=0):
        # y [BN] fp32, final sums of rows rn of W for row m of x, stored as y's dtype; with GLU the block's first
        # half are gate rows j and its second half their up rows (row_block), and SiLU(gate) * up goes to column
        # j of y [M, N / 2]. RES: plus the residual r (load_residual's, the same columns), added to the rounded
        # output in fp32 and rounded once, as the unfused `r + linear(x)` does
        ty = y_ptr.dtype.element_ty
        if ROPE_D > 0:  # rows i and i + D/2 of a head (row_block): rotated if in the first rope_rows, as stored
            a, b = tl.split(tl.permute(tl.reshape(y, (2, y.shape[0] // 2)), (1, 0)))       # [BN / 2] each
            ra, rb = tl.split(tl.permute(tl.reshape(rn, (2, rn.shape[0] // 2)), (1, 0)))
            a, b = a.to(ty).to(tl.float32), b.to(ty).to(tl.float32)
            c, s = cos.to(tl.float32), sin.to(tl.float32)
            rot = ra < rope_rows
            tl.store(y_ptr + m * stride_ym + ra, tl.where(rot, a * c - b * s, a).to(ty), mask=ra < N)
            tl.store(y_ptr + m * stride_ym + rb, tl.where(rot, b * c + a * s, b).to(ty), mask=rb < N)
        else:
            if GLU:
                g, u = tl.split(tl.permute(tl.reshape(y, (2, y.shape[0] // 2)), (1, 0)))       # [BN / 2] each
                j, _ = tl.split(tl.permute(tl.reshape(rn, (2, rn.shape[0] // 2)), (1, 0)))     # gate rows = columns
                out, col, n_out = silu_up(g, u, ty), j, N // 2
            else:
                out, col, n_out = y.to(ty), rn, N
            if RES:
                out = (out.to(tl.float32) + r.to(tl.float32)).to(ty)
            tl.store(y_ptr + m * stride_ym + col, out, mask=col < n_out)

    @triton.jit
    def store_row_block(y, y_ptr, s_ptr, part_ptr, count_ptr, pid, split, m, M, N, rn, rn_in, stride_ym,
                        SPLIT: tl.constexpr, SCALE: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr = False,
                        r=None, ROPE_D: tl.constexpr = 0, cos=None, sin=None, rope_rows=0):
        # y [BN] fp32: this program's sums for rows rn of W and row m of x, over its share of K. Without
        # a split: (* scale) and store. With one: the partial sums go to the workspace; the last of the
        # SPLIT programs of this (block, m) to finish adds them up, stores y and sets the counter back
        # to 0 for the next call.
        if SPLIT == 1:
            if SCALE:
                y *= tl.load(s_ptr + rn_in).to(tl.float32)
            store_rows(y, y_ptr, m, N, rn, stride_ym, GLU, RES, r, ROPE_D, cos, sin, rope_rows)
        else:
            tl.store(part_ptr + (split * M + m) * N + rn, y, mask=rn < N)
            tl.debug_barrier()  # every thread's store before the counter moves
            done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
            if done == SPLIT - 1:
                total = tl.zeros_like(y)
                for t in tl.static_range(SPLIT):
                    total += tl.load(part_ptr + (t * M + m) * N + rn, mask=rn < N, other=0.0, cache_modifier=".cg")
                if SCALE:
                    total *= tl.load(s_ptr + rn_in).to(tl.float32)
                store_rows(total, y_ptr, m, N, rn, stride_ym, GLU, RES, r, ROPE_D, cos, sin,
                           rope_rows)
                tl.atomic_xchg(count_ptr + pid, 0)

    @triton.jit
    def load_residual(r_ptr, m, N, rn, stride_ym, GLU: tl.constexpr):
        # the residual of the columns store_rows will store (RES), loaded right after PDL's wait so that its
        # round trip overlaps the program's loop instead of following it
        if GLU:
            col, _ = tl.split(tl.permute(tl.reshape(rn, (2, rn.shape[0] // 2)), (1, 0)))
            n_out = N // 2
        else:
            col, n_out = rn, N
        return tl.load(r_ptr + m * stride_ym + col, mask=col < n_out, other=0.0)

    @triton.jit
    def epilogue_operands(r_ptr, cos_ptr, sin_ptr, m, N, rn, stride_ym, GLU, RES, ROPE_D):
        # what store_rows adds or rotates with (RES: the residual, ROPE_D: cos and sin; 0.0 where not asked),
        # loaded right after PDL's wait: their round trips overlap the program's loop. GLU, RES and ROPE_D
        # arrive as the kernel's constexprs (annotated here, Triton 3.6 fails to resolve `tl`, as in mma_rotate)
        r, cos, sin = 0.0, 0.0, 0.0
        if RES:
            r = load_residual(r_ptr, m, N, rn, stride_ym, GLU)
        if ROPE_D > 0:
            cos, sin = load_rope(cos_ptr, sin_ptr, m, rn, ROPE_D)
        return r, cos, sin

    @triton.jit
    def load_rope(cos_ptr, sin_ptr, m, rn, ROPE_D: tl.constexpr):
        # RoPE's cos and sin (rows of x [M, D]) for the first half of the block's rows (row_block with ROPE_D):
        # index i of the head; its partner i + D/2 has the same angle
        ra, _ = tl.split(tl.permute(tl.reshape(rn, (2, rn.shape[0] // 2)), (1, 0)))
        i = ra % ROPE_D
        return tl.load(cos_ptr + m * ROPE_D + i), tl.load(sin_ptr + m * ROPE_D + i)

    @triton.jit
    def rms_rstd(x_row, K, eps, PAIRS: tl.constexpr, NORM_K: tl.constexpr):
        # RMSNorm's 1 / sqrt(mean(x^2) + eps) over one row of x, K bf16 (PAIRS: read as K / 2 int32 words of
        # two), in fp32 as the reference computes it. Every program of a GEMV with NORM reads its row of x whole
        # (8 KB at K = 4096, from L2) for this, whatever share of K it multiplies: in one load (NORM_K >= K, a
        # power of two), a single round trip
        n = K // 2 if PAIRS else K
        offs = tl.arange(0, NORM_K // 2 if PAIRS else NORM_K)
        v = tl.load(x_row + offs, mask=offs < n, other=0)
        if PAIRS:
            lo = (v << 16).to(tl.float32, bitcast=True)
            hi = (v & -65536).to(tl.float32, bitcast=True)
            ss = lo * lo + hi * hi
        else:
            v = v.to(tl.float32)
            ss = v * v
        return 1.0 / tl.sqrt_rn(tl.sum(ss, axis=0) / K + eps)

    @triton.jit
    def rms_scale(x, g, rstd, ASM: tl.constexpr):
        # RMSNorm of x's elements (any float dtype) with the weight's g (bf16) -> bf16, rounded as the reference
        # rounds: (x * rstd) to bf16, then times g, to bf16 (ASM: that product as sm_90's bf16 multiply, which
        # rounds the exact product once, as the fp32 one does; the interpreter has no bf16 arithmetic)
        xn = (x.to(tl.float32) * rstd).to(tl.bfloat16)
        if ASM:
            return xn * g
        return (xn.to(tl.float32) * g.to(tl.float32)).to(tl.bfloat16)

    @triton.jit
    def rms_scale_pairs(xw, gw, rstd, ASM: tl.constexpr):
        # rms_scale on int32 words of two bf16 (x and the weight g as the h2 kernels read them) -> such words
        if ASM:  # 6 instructions a pair
            return tl.inline_asm_elementwise(
                "{ .reg .b32 a, b, t; shl.b32 a, $1, 16; and.b32 b, $1, 0xFFFF0000; mul.rn.f32 a, a, $3; "
                "mul.rn.f32 b, b, $3; cvt.rn.bf16x2.f32 t, b, a; mul.rn.bf16x2 $0, t, $2; }",
                "=r,r,r,r", [xw, gw, rstd + tl.zeros_like(xw).to(tl.float32)], dtype=tl.int32, is_pure=True, pack=1)
        lo = rms_scale((xw << 16).to(tl.float32, bitcast=True), (gw << 16).to(tl.float32, bitcast=True), rstd, False)
        hi = rms_scale((xw & -65536).to(tl.float32, bitcast=True), (gw & -65536).to(tl.float32, bitcast=True), rstd,
                       False)
        return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def k_range(K, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
        # the columns k_lo .. k_hi - 1 this program sums over: all of K, or its split's share in whole tiles
        if SPLIT == 1:
            k_lo = 0
            k_hi = K
        else:
            per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
            k_lo = tl.program_id(1) * per
            k_hi = tl.minimum(k_lo + per, K)
        return k_lo, k_hi

    @triton.jit
    def group_range(K, GROUP: tl.constexpr, SPLIT: tl.constexpr):
        # the int4 kernels' groups g_lo .. g_hi - 1 of split program_id(1) (whole groups; a split may be empty)
        n_groups = K // GROUP
        per = tl.cdiv(n_groups, SPLIT)
        g_lo = tl.program_id(1) * per
        return g_lo, tl.minimum(g_lo + per, n_groups)

    @triton.jit
    def row_block(M, N, BLOCK_N: tl.constexpr, GLU: tl.constexpr, ROPE_D: tl.constexpr = 0):
        # a program of the fma and h2 kernels (one per block of BLOCK_N rows of W and row of x, rows of x
        # fastest): its row m of x, its rows rn of W, and rn clamped into W (loads stay in bounds, stores mask).
        # GLU (W = [gate; up], N = 2F): the block's rows are gate rows j0 .. j0 + BN/2 - 1, then up rows F + j0 ..,
        # so a program holds both halves of its BN / 2 outputs (halves, not interleaved pairs: on the H200 the
        # interleaved rows read W ~5% slower); rn is N (masked) past the last output
        # ROPE_D (q/k/v heads of ROPE_D rows, ROPE_D % BN == 0): the block's rows are rows i0 .. i0 + BN/2 - 1 of a
        # head, then the rows D/2 further that RoPE rotates with them
        pid = tl.program_id(0)
        if ROPE_D > 0:
            r = tl.arange(0, BLOCK_N)
            blk = pid // M
            head = blk // (ROPE_D // BLOCK_N)
            i0 = (blk % (ROPE_D // BLOCK_N)) * (BLOCK_N // 2)
            rn = head * ROPE_D + (r // (BLOCK_N // 2)) * (ROPE_D // 2) + i0 + r % (BLOCK_N // 2)   # [BN]
            return pid % M, rn, tl.minimum(rn, N - 1)
        if GLU:
            r = tl.arange(0, BLOCK_N)
            half = N // 2
            j = (pid // M) * (BLOCK_N // 2) + r % (BLOCK_N // 2)                  # [BN]
            up = (r // (BLOCK_N // 2)) * half
            return pid % M, tl.where(j < half, up + j, N), up + tl.minimum(j, half - 1)
        rn = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)                      # [BN]
        return pid % M, rn, tl.minimum(rn, N - 1)

    @triton.jit
    def word_tile_at(w_ptr, w_off, k_pos, k, k_hi):
        # int8 W's [BN, BK/4] word tile at column k (a multiple of 4), zeros past k_hi
        return tl.load(w_ptr + k // 4 + w_off, mask=k_pos + k < k_hi, other=0)

    @triton.jit
    def int8_word_tile(w_ptr, rn_in, stride_wn, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, SPLIT: tl.constexpr):
        # int8 W read as int32 words [N, K/4] in [BN, BK/4] tiles (int8_fma, int8_h2): the tile's offsets, the
        # program's columns k_lo .. k_hi - 1, each word's column for the masks past k_hi (per tile for whole
        # tiles, per word for a ragged K, K % 4 == 0), and the first tile, loaded before PDL's wait (W is
        # never written)
        rc = tl.arange(0, BLOCK_K // 4)
        w_off = rn_in[:, None].to(tl.int64) * stride_wn + rc[None, :]          # [BN, C] words
        k_lo, k_hi = k_range(K, BLOCK_K, SPLIT)
        if EVEN_K:
            k_pos = tl.zeros((BLOCK_N, BLOCK_K // 4), tl.int32)
        else:
            k_pos = 4 * rc[None, :] + tl.zeros((BLOCK_N, BLOCK_K // 4), tl.int32)
        return w_off, k_lo, k_hi, k_pos, word_tile_at(w_ptr, w_off, k_pos, k_lo, k_hi)

    @triton.jit
    def int8_x_tile(C: tl.constexpr, PER: tl.constexpr, EVEN_K: tl.constexpr):
        # x for int8_fma (PER = 4 bf16 a weight word) and int8_h2 (PER = 2 words of two bf16): offsets
        # [C, PER], x item PER c + i, and each item's first column for the masks past k_hi (as k_pos)
        x_off = PER * tl.arange(0, C)[:, None] + tl.arange(0, PER)[None, :]
        if EVEN_K:
            xk_pos = tl.zeros((C, PER), tl.int32)
        else:
            xk_pos = (4 // PER) * x_off
        return x_off, xk_pos

    @triton.jit
    def int4_group_tile(p_ptr, sz_ptr, rn_in, stride_pn, stride_szn, K, GROUP: tl.constexpr,
                        BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
        # int4 words [N, K/8] a group at a time (int4_fma, int4_h2): the [BN, G/8] tile's offsets, the rows'
        # scale pointers, the groups g_lo .. g_hi - 1 of split program_id(1), zero tiles to spread a group
        # index over for masks (a scalar mask works compiled but not in Triton's interpreter), and the first
        # group's words and scales, loaded before PDL's wait (W and its scales are never written)
        rw = tl.arange(0, GROUP // 8)
        p_off = rn_in[:, None].to(tl.int64) * stride_pn + rw[None, :]           # [BN, W]
        sz_row = sz_ptr + rn_in.to(tl.int64) * stride_szn                         # [BN]
        g_lo, g_hi = group_range(K, GROUP, SPLIT)
        tile0, row0 = tl.zeros((BLOCK_N, GROUP // 8), tl.int32), tl.zeros((BLOCK_N,), tl.int32)
        words = tl.load(p_ptr + g_lo * (GROUP // 8) + p_off, mask=tile0 + g_lo < g_hi, other=0)
        sz = tl.load(sz_row + g_lo, mask=row0 + g_lo < g_hi, other=0)
        return p_off, sz_row, g_lo, g_hi, tile0, row0, words, sz

    @triton.jit
    def int8_to_f32(w, PRMT: tl.constexpr):
        # int8 codes -> fp32 exactly, through the bits of 2^23 + 128 + q: one byte permute a code (PTX prmt on
        # four codes a register, XORed with 0x80 to make q + 128 unsigned) or a sign extension and an add
        if PRMT:
            f = tl.inline_asm_elementwise(
                "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; prmt.b32 $0, t, 0x4B000000, 0x7650; "
                "prmt.b32 $1, t, 0x4B000000, 0x7651; prmt.b32 $2, t, 0x4B000000, 0x7652; "
                "prmt.b32 $3, t, 0x4B000000, 0x7653; }",
                "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
        else:
            f = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True)
        return f - 8388736.0

    # ---- tensor-core GEMV pieces (int8_mma): one warp computes a [16 rows of W] x [16 columns] x [8 rows of
    # x] product per mma.sync.m16n8k16 (fp16 in, fp32 sums). A lane (g = lane // 4, c = lane % 4) holds, of
    # the 16 x 16 A operand, rows g and g + 8 at k-slots 2c, 2c + 1, 2c + 8, 2c + 9, and of the 16 x 8 B
    # operand column g at the same k-slots: which column of W a k-slot stands for is ours to choose, as long
    # as A and B agree, so a lane feeds the mma with the codes it loaded itself (no shuffles) and the x
    # columns they multiply. Every operand is a [32] tensor, one register a lane (element i in lane i: the
    # only layout Triton gives a [32] tensor in one warp); tiles and words are unrolled over tuples of them.

    @triton.jit
    def unstack4(v):
        # [32, 4] -> four [32] tensors (element j of the last dim each; the dim is in one thread's registers)
        even, odd = tl.split(tl.reshape(v, (32, 2, 2)))
        v0, v2 = tl.split(even)
        v1, v3 = tl.split(odd)
        return v0, v1, v2, v3

    @triton.jit
    def unstack(v, N):
        # [32, N] -> N tensors [32], N = 1, 2 or 4
        if N == 1:
            return (tl.reshape(v, (32,)),)
        elif N == 2:
            return tl.split(v)
        else:
            return unstack4(v)

    @triton.jit
    def f16_bits(f):
        # fp32 -> fp16 (round to nearest) as the low 16 bits of an int32
        return f.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF

    @triton.jit
    def x_f16_pairs(xe, xo, ASM: tl.constexpr):
        # x's bf16 pairs (x[k], x[k+1]) and (x[k+2], x[k+3]) -> the fp16 pairs (x[k], x[k+2]), (x[k+1], x[k+3])
        # that meet a word's codes 0, 2 and 1, 3 (int8_f16_pairs)
        if ASM:
            b0, b1 = tl.inline_asm_elementwise(
                "{ .reg .b32 a, b; shl.b32 a, $2, 16; shl.b32 b, $3, 16; cvt.rn.f16x2.f32 $0, b, a; "
                "and.b32 a, $2, 0xFFFF0000; and.b32 b, $3, 0xFFFF0000; cvt.rn.f16x2.f32 $1, b, a; }",
                "=r,=r,r,r", [xe, xo], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            b0 = (f16_bits((xe << 16).to(tl.float32, bitcast=True))
                  | (f16_bits((xo << 16).to(tl.float32, bitcast=True)) << 16))
            b1 = (f16_bits((xe & -65536).to(tl.float32, bitcast=True))
                  | (f16_bits((xo & -65536).to(tl.float32, bitcast=True)) << 16))
        return b0, b1

    @triton.jit
    def int8_f16_pairs(w, ASM: tl.constexpr):
        # a word of four int8 codes -> fp16 pairs 1152 + q of codes (0, 2) and (1, 3): one LOP3 each puts a
        # byte, its top bit flipped (q + 128), under the exponent of 1024 ((w & m) ^ 0x80 | 0x6400 per half)
        if ASM:
            p02, p13 = tl.inline_asm_elementwise(
                "{ .reg .b32 m, k, t; mov.b32 m, 0x00FF00FF; mov.b32 k, 0x64806480; lop3.b32 $0, $2, m, k, 0x6A; "
                "shr.b32 t, $2, 8; lop3.b32 $1, t, m, k, 0x6A; }",
                "=r,=r,r", [w], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            p02 = ((w & 0x00FF00FF) ^ 0x00800080) | 0x64006400
            p13 = (((w >> 8) & 0x00FF00FF) ^ 0x00800080) | 0x64006400
        return p02, p13

    @triton.jit
    def int4_f16_pairs(w, ASM: tl.constexpr):
        # a word of eight int4 codes (code j at bits 4j..4j+3) -> fp16 pairs (1024 + q0, 1024 + q4),
        # (64 + q1, 64 + q5), (1024 + q2, 1024 + q6), (64 + q3, 64 + q7): one LOP3 each puts a nibble under the
        # exponent that makes its lowest bit worth 1 (0x6400 for bits 0..3 of a half, 0x5400 for bits 4..7)
        if ASM:
            p04, p15, p26, p37 = tl.inline_asm_elementwise(
                "{ .reg .b32 m, n, e, f, t; mov.b32 m, 0x000F000F; mov.b32 n, 0x00F000F0; mov.b32 e, 0x64006400; "
                "mov.b32 f, 0x54005400; lop3.b32 $0, $4, m, e, 0xEA; lop3.b32 $1, $4, n, f, 0xEA; shr.b32 t, $4, 8; "
                "lop3.b32 $2, t, m, e, 0xEA; lop3.b32 $3, t, n, f, 0xEA; }",
                "=r,=r,=r,=r,r", [w], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            p04 = (w & 0x000F000F) | 0x64006400
            p15 = (w & 0x00F000F0) | 0x54005400
            p26 = ((w >> 8) & 0x000F000F) | 0x64006400
            p37 = ((w >> 8) & 0x00F000F0) | 0x54005400
        return p04, p15, p26, p37

    @triton.jit
    def x_f16_quads(x01, x23, x45, x67, ASM: tl.constexpr):
        # a word's eight x as bf16 pairs (x0, x1) .. (x6, x7) -> the fp16 pairs (x0, x4), (x1, x5), (x2, x6),
        # (x3, x7) that meet the codes j, j + 4 of an int4 word (int4_h2; int4_mma through int4_f16_pairs)
        if ASM:
            b04, b15, b26, b37 = tl.inline_asm_elementwise(
                "{ .reg .b32 a, b; shl.b32 a, $4, 16; shl.b32 b, $6, 16; cvt.rn.f16x2.f32 $0, b, a; "
                "and.b32 a, $4, 0xFFFF0000; and.b32 b, $6, 0xFFFF0000; cvt.rn.f16x2.f32 $1, b, a; "
                "shl.b32 a, $5, 16; shl.b32 b, $7, 16; cvt.rn.f16x2.f32 $2, b, a; "
                "and.b32 a, $5, 0xFFFF0000; and.b32 b, $7, 0xFFFF0000; cvt.rn.f16x2.f32 $3, b, a; }",
                "=r,=r,=r,=r,r,r,r,r", [x01, x23, x45, x67], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                is_pure=True, pack=1)
        else:
            b04, b15 = x_f16_pairs(x01, x45, False)
            b26, b37 = x_f16_pairs(x23, x67, False)
        return b04, b15, b26, b37

    @triton.jit
    def half_pairs_f32(v, BF16: tl.constexpr):
        # int32 registers of two fp16 (or bf16) -> [..., 2] fp32: (low half, high half)
        if BF16:
            return tl.join((v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True))
        return tl.join((v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                       ((v >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))

    @triton.jit
    def mma_rows(a_lo, a_hi, b0, b1, BF16: tl.constexpr):
        # mma_16816 without PTX, 8 rows of A: lane (g, c) gets sum_k A[g, k] B[k, 2c] and B[k, 2c + 1], where
        # a_lo / a_hi hold A[g, 2c:2c+2] / A[g, 2c+8:2c+10] and b0 / b1 B[2c:2c+2, g] / B[2c+8:2c+10, g].
        # A lane's four k-slots side by side, each half made fp32: [32, 2 (register), 2 (half)] -> [8, 16]
        a = half_pairs_f32(tl.join(a_lo, a_hi), BF16)
        b = half_pairs_f32(tl.join(b0, b1), BF16)
        a = tl.reshape(a, (8, 16))                                                 # [row g, (c, slot)]
        b = tl.reshape(b, (8, 16))                                                 # [column n, (c, slot)]
        out = tl.sum(a[:, None, :] * b[None, :, :], axis=2)                        # [8 (g), 8 (n)]
        even, odd = tl.split(tl.reshape(out, (8, 4, 2)))                           # n = 2c, 2c + 1: [8, 4]
        return tl.reshape(even, (32,)), tl.reshape(odd, (32,))

    @triton.jit
    def mma_16816(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, ASM: tl.constexpr, BF16: tl.constexpr = False):
        # d = a @ b + c, mma.sync.m16n8k16 with fp16 (BF16: bf16) operands (int32 registers of two) and fp32
        # sums. Lane (g, c): a0 = A[g, 2c:2c+2], a1 = A[g+8, 2c:2c+2], a2 = A[g, 2c+8:2c+10], a3 = A[g+8, 2c+8:2c+10];
        # b0 = B[2c:2c+2, g], b1 = B[2c+8:2c+10, g]; c0, c1 = C[g, 2c], C[g, 2c+1]; c2, c3 = C[g+8, 2c], C[g+8, 2c+1].
        # Without PTX (the interpreter) the same product from the lanes' registers with tl ops.
        if ASM:
            d0, d1, d2, d3 = tl.inline_asm_elementwise(
                "mma.sync.aligned.m16n8k16.row.col.f32." + ("bf16.bf16" if BF16 else "f16.f16") + ".f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        else:
            d0, d1 = mma_rows(a0, a2, b0, b1, BF16)
            d2, d3 = mma_rows(a1, a3, b0, b1, BF16)
            d0, d1, d2, d3 = c0 + d0, c1 + d1, c2 + d2, c3 + d3
        return d0, d1, d2, d3

    # Triton's interpreter finds a kernel's helpers only among the module's globals (the compiler also
    # looks in the closure): published there, since the kernels are built here, after the tests set
    # TRITON_INTERPRET
    globals().update(silu_up=silu_up, store_rows=store_rows, store_row_block=store_row_block, k_range=k_range,
                     rms_rstd=rms_rstd, load_residual=load_residual, load_rope=load_rope,
                     epilogue_operands=epilogue_operands, rms_scale=rms_scale, rms_scale_pairs=rms_scale_pairs,
                     group_range=group_range, row_block=row_block, word_tile_at=word_tile_at,
                     int8_word_tile=int8_word_tile, int8_x_tile=int8_x_tile, int4_group_tile=int4_group_tile,
                     int8_to_f32=int8_to_f32, unstack4=unstack4, unstack=unstack, f16_bits=f16_bits,
                     x_f16_pairs=x_f16_pairs, int8_f16_pairs=int8_f16_pairs, half_pairs_f32=half_pairs_f32, mma_rows=mma_rows,
                     mma_16816=mma_16816, int4_f16_pairs=int4_f16_pairs,
                     x_f16_quads=x_f16_quads)


    @triton.jit
    def fma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   QUANT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   STAGES: tl.constexpr, SPLIT: tl.constexpr, AHEAD: tl.constexpr, PRMT: tl.constexpr,
                   PEEL: tl.constexpr, PDL: tl.constexpr, GLU: tl.constexpr = False, NORM: tl.constexpr = False,
                   RES: tl.constexpr = False, g_ptr=None, r_ptr=None, eps=0.0, NORM_K: tl.constexpr = 0,
                   NORM_ASM: tl.constexpr = False, ROPE_D: tl.constexpr = 0, cos_ptr=None, sin_ptr=None, rope_rows=0):
        # y[m, n] = sum_k x[m, k] w[n, k] (* s[n] if QUANT): w bf16 or int8 [N, K], one row m per program,
        # columns k_lo..k_hi - 1 of split s (all of K when SPLIT == 1); int8 made fp32 by int8_to_f32.
        # NORM: x is RMSNorm(x) with weight g (rms_rstd, rms_scale) as it is read; RES: y + r (store_rows).
        pid = tl.program_id(0)
        m, rn, rn_in = row_block(M, N, BLOCK_N, GLU, ROPE_D)
        rk = tl.arange(0, BLOCK_K)                                             # [BK]
        w_off = rn_in[:, None].to(tl.int64) * stride_wn + rk[None, :]          # [BN, BK]
        # x as a [BN, BK] tile whose rows are all x[m]: it gets w's register layout, so no shuffles; the
        # compiler loads each element once per thread
        x_off = 0 * rn_in[:, None] + rk[None, :]                               # [BN, BK]
        x_row = x_ptr + m * stride_xm
        k_lo, k_hi = k_range(K, BLOCK_K, SPLIT)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        if AHEAD == 0:
            k_start = k_lo
            if PEEL:  # with PDL, launched while the previous kernel still runs: read W's first tile (W is
                # never written by anyone), then wait for that kernel (it writes x) before touching x or y
                in_k = rk[None, :] < k_hi - k_lo
                w = tl.load(w_ptr + k_lo + w_off, mask=in_k, other=0)
                if PDL:
                    tl.extra.cuda.gdc_wait()
                r, cos, sin = epilogue_operands(r_ptr, cos_ptr, sin_ptr, m, N, rn, stride_ym, GLU, RES, ROPE_D)
                x = tl.load(x_row + k_lo + x_off, mask=in_k, other=0.0)
                if NORM:
                    rstd = rms_rstd(x_row, K, eps, False, NORM_K)
                    x = rms_scale(x, tl.load(g_ptr + k_lo + x_off, mask=in_k, other=0.0), rstd, NORM_ASM)
                if QUANT:
                    w = int8_to_f32(w, PRMT)
                acc += w.to(tl.float32) * x.to(tl.float32)
                k_start = k_lo + BLOCK_K
            else:  # no PDL
                r, cos, sin = epilogue_operands(r_ptr, cos_ptr, sin_ptr, m, N, rn, stride_ym, GLU, RES, ROPE_D)
                if NORM:
                    rstd = rms_rstd(x_row, K, eps, False, NORM_K)
            for k0 in tl.range(k_start, k_hi, BLOCK_K, num_stages=STAGES):
                if EVEN_K:
                    w = tl.load(w_ptr + k0 + w_off)
                    x = tl.load(x_row + k0 + x_off)
                    if NORM:
                        x = rms_scale(x, tl.load(g_ptr + k0 + x_off), rstd, NORM_ASM)
                else:
                    in_k = rk[None, :] < k_hi - k0
                    w = tl.load(w_ptr + k0 + w_off, mask=in_k, other=0)
                    x = tl.load(x_row + k0 + x_off, mask=in_k, other=0.0)
                    if NORM:
                        x = rms_scale(x, tl.load(g_ptr + k0 + x_off, mask=in_k, other=0.0), rstd, NORM_ASM)
                if QUANT:
                    w = int8_to_f32(w, PRMT)
                acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            # register prefetch: each step loads the tile AHEAD tiles on before this one's math, so a warp
            # keeps loads in flight while it computes (the first tiles before PDL's wait: W is never
            # written). Masks past k_hi: per tile (whole tiles) or per column (a ragged K).
            if EVEN_K:
                k_pos = tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
            else:
                k_pos = rk[None, :] + tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
            w = tl.load(w_ptr + k_lo + w_off, mask=k_pos + k_lo < k_hi, other=0)
            if AHEAD == 2:
                w2 = tl.load(w_ptr + k_lo + BLOCK_K + w_off, mask=k_pos + k_lo + BLOCK_K < k_hi, other=0)
            if PDL:
                tl.extra.cuda.gdc_wait()
            r, cos, sin = epilogue_operands(r_ptr, cos_ptr, sin_ptr, m, N, rn, stride_ym, GLU, RES, ROPE_D)
            if NORM:
                rstd = rms_rstd(x_row, K, eps, False, NORM_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k_next = k0 + AHEAD * BLOCK_K
                w_next = tl.load(w_ptr + k_next + w_off, mask=k_pos + k_next < k_hi, other=0)
                if EVEN_K:
                    x = tl.load(x_row + k0 + x_off)
                    if NORM:
                        x = rms_scale(x, tl.load(g_ptr + k0 + x_off), rstd, NORM_ASM)
                else:
                    x = tl.load(x_row + k0 + x_off, mask=k_pos + k0 < k_hi, other=0.0)
                    if NORM:
                        x = rms_scale(x, tl.load(g_ptr + k0 + x_off, mask=k_pos + k0 < k_hi, other=0.0), rstd, NORM_ASM)
                if QUANT:
                    w = int8_to_f32(w, PRMT)
                acc += w.to(tl.float32) * x.to(tl.float32)
                if AHEAD == 2:
                    w, w2 = w2, w_next
                else:
                    w = w_next
        if PDL:  # the next kernel may launch now and wait for this one's end in its own gdc_wait
            tl.extra.cuda.gdc_launch_dependents()
        store_row_block(tl.sum(acc, axis=1), y_ptr, s_ptr, part_ptr, count_ptr, pid, tl.program_id(1), m, M, N,
                        rn, rn_in, stride_ym, SPLIT, QUANT, GLU, RES, r, ROPE_D, cos, sin, rope_rows)

    @triton.jit
    def dot_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, STAGES: tl.constexpr, SPLIT: tl.constexpr, PEEL: tl.constexpr,
                   PDL: tl.constexpr):
        # y^T [BN, BM] = w [BN, BK] @ x^T [BK, BM] on tensor cores; w is the left operand (K-contiguous rows)
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = tl.minimum(rn, N - 1)
        rm = tl.arange(0, BLOCK_M)
        rm_in = tl.minimum(rm, M - 1)  # padding rows repeat row M - 1; their results are not stored
        rk = tl.arange(0, BLOCK_K)
        w_off = rn_in[:, None].to(tl.int64) * stride_wn + rk[None, :]           # [BN, BK]
        x_off = rm_in[:, None] * stride_xm + rk[None, :]                         # [BM, BK]
        k_lo, k_hi = k_range(K, BLOCK_K, SPLIT)  # (N = 4096 in blocks of 64 rows is only 64 programs)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        k_start = k_lo
        if PEEL:  # as in fma_kernel: W's first tile before waiting for the kernel that writes x
            in_k = rk[None, :] < k_hi - k_lo
            w = tl.load(w_ptr + k_lo + w_off, mask=in_k, other=0)
            if PDL:
                tl.extra.cuda.gdc_wait()
            x = tl.load(x_ptr + k_lo + x_off, mask=in_k, other=0.0)
            acc = tl.dot(w.to(tl.bfloat16), tl.trans(x), acc)
            k_start = k_lo + BLOCK_K
        for k0 in tl.range(k_start, k_hi, BLOCK_K, num_stages=STAGES):
            if EVEN_K:
                w = tl.load(w_ptr + k0 + w_off)
                x = tl.load(x_ptr + k0 + x_off)
            else:
                in_k = rk[None, :] < k_hi - k0
                w = tl.load(w_ptr + k0 + w_off, mask=in_k, other=0)
                x = tl.load(x_ptr + k0 + x_off, mask=in_k, other=0.0)
            acc = tl.dot(w.to(tl.bfloat16), tl.trans(x), acc)  # int8 -> bf16 is exact
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        out_mask = (rm[None, :] < M) & (rn[:, None] < N)
        if SPLIT == 1:
            if QUANT:
                acc *= tl.load(s_ptr + rn_in).to(tl.float32)[:, None]
            tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            part_off = rm[None, :] * N + rn[:, None]                               # [BN, BM] of [M, N]
            tl.store(part_ptr + tl.program_id(1) * M * N + part_off, acc, mask=out_mask)
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
            if done == SPLIT - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
                for t in tl.static_range(SPLIT):
                    total += tl.load(part_ptr + t * M * N + part_off, mask=out_mask, other=0.0, cache_modifier=".cg")
                if QUANT:
                    total *= tl.load(s_ptr + rn_in).to(tl.float32)[:, None]
                tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], total.to(y_ptr.dtype.element_ty),
                         mask=out_mask)
                tl.atomic_xchg(count_ptr + pid, 0)

    @triton.jit
    def int8_fma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                        AHEAD: tl.constexpr, ASM: tl.constexpr, PEEL: tl.constexpr, PDL: tl.constexpr,
                        GLU: tl.constexpr = False, NORM: tl.constexpr = False, RES: tl.constexpr = False, g_ptr=None,
                        r_ptr=None, eps=0.0, NORM_K: tl.constexpr = 0, NORM_ASM: tl.constexpr = False,
                        ROPE_D: tl.constexpr = 0, cos_ptr=None, sin_ptr=None, rope_rows=0):
        # w: int8 [N, K] read as int32 words [N, K/4] (code 4c + j in byte j), one row m of x per program,
        # tiles of [BN, BK/4] words loaded AHEAD tiles before their math (0: none). A word's four bytes,
        # XORed with 0x80 (q + 128 >= 0), each become the fp32 2^23 + 128 + q with one byte permute (PTX prmt
        # when ASM; the same with shifts and masks otherwise), minus 2^23 + 128 in one FADD.
        C: tl.constexpr = BLOCK_K // 4
        pid = tl.program_id(0)
        m, rn, rn_in = row_block(M, N, BLOCK_N, GLU, ROPE_D)
        w_off, k_lo, k_hi, k_pos, w = int8_word_tile(w_ptr, rn_in, stride_wn, K, BLOCK_N, BLOCK_K, EVEN_K, SPLIT)
        x_off, xk_pos = int8_x_tile(C, 4, EVEN_K)                                # [C, 4]: x of word c, byte j
        x_row = x_ptr + m * stride_xm
        if AHEAD == 2:
            w2 = word_tile_at(w_ptr, w_off, k_pos, k_lo + BLOCK_K, k_hi)
        if PDL:
            tl.extra.cuda.gdc_wait()
        r, cos, sin = epilogue_operands(r_ptr, cos_ptr, sin_ptr, m, N, rn, stride_ym, GLU, RES, ROPE_D)
        if NORM:
            rstd = rms_rstd(x_row, K, eps, False, NORM_K)
        acc = tl.zeros((BLOCK_N, C), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if AHEAD > 0:
                k_next = k0 + AHEAD * BLOCK_K
                w_next = word_tile_at(w_ptr, w_off, k_pos, k_next, k_hi)
            else:
                w = word_tile_at(w_ptr, w_off, k_pos, k0, k_hi)
            if EVEN_K:
                xt = tl.load(x_row + k0 + x_off)                                 # [C, 4]
                if NORM:
                    xt = rms_scale(xt, tl.load(g_ptr + k0 + x_off), rstd, NORM_ASM)
            else:
                xt = tl.load(x_row + k0 + x_off, mask=xk_pos + k0 < k_hi, other=0.0)
                if NORM:
                    xt = rms_scale(xt, tl.load(g_ptr + k0 + x_off, mask=xk_pos + k0 < k_hi, other=0.0), rstd, NORM_ASM)
            xt = xt.to(tl.float32)
            x02, x13 = tl.split(tl.reshape(xt, (C, 2, 2)))                      # [C, 2]: j = 0, 2 / 1, 3
            x0, x2 = tl.split(x02)                                               # [C] each
            x1, x3 = tl.split(x13)
            if ASM:
                v0, v1, v2, v3 = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; prmt.b32 $0, t, 0x4B000000, 0x7650; "
                    "prmt.b32 $1, t, 0x4B000000, 0x7651; prmt.b32 $2, t, 0x4B000000, 0x7652; "
                    "prmt.b32 $3, t, 0x4B000000, 0x7653; }",
                    "=r,=r,=r,=r,r", [w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                    is_pure=True, pack=1)
            else:
                u = w ^ -2139062144                                              # 0x80808080
                v0 = ((u & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True)
                v1 = (((u >> 8) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True)
                v2 = (((u >> 16) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True)
                v3 = (((u >> 24) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True)
            acc += (v0 - 8388736.0) * x0[None, :]
            acc += (v1 - 8388736.0) * x1[None, :]
            acc += (v2 - 8388736.0) * x2[None, :]
            acc += (v3 - 8388736.0) * x3[None, :]
            if AHEAD == 2:
                w, w2 = w2, w_next
            elif AHEAD == 1:
                w = w_next
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        store_row_block(tl.sum(acc, axis=1), y_ptr, s_ptr, part_ptr, count_ptr, pid, tl.program_id(1), m, M, N,
                        rn, rn_in, stride_ym, SPLIT, True, GLU, RES, r, ROPE_D, cos, sin, rope_rows)

    @triton.jit
    def int8_h2_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                       AHEAD: tl.constexpr, ASM: tl.constexpr, PEEL: tl.constexpr, PDL: tl.constexpr,
                       GLU: tl.constexpr = False, NORM: tl.constexpr = False, RES: tl.constexpr = False, g_ptr=None,
                       r_ptr=None, eps=0.0, NORM_K: tl.constexpr = 0, NORM_ASM: tl.constexpr = False,
                       ROPE_D: tl.constexpr = 0, cos_ptr=None, sin_ptr=None, rope_rows=0):
        # int8_fma's tiles and prefetch, with the products in packed half precision: x is read as int32 words
        # of two bf16 ([M, K/2]) and made fp16 pairs (x[4c], x[4c+1]), (x[4c+2], x[4c+3]); a weight word's
        # four codes, XORed with 0x80, become two fp16 pairs 1024 + 128 + q by two byte permutes under the
        # constant byte 0x64, then q/64 exactly with one fp16x2 FMA (* 2^-6 - 18); two fp16x2 FMAs add
        # (q/64) x into a word's pair of fp16 partial sums (kept in an int32): 1.75 PTX instructions a weight
        # (2.4-2.8 in the SASS loop, loads and x included) against int8_fma's 3.9-4.7. q/64 keeps products
        # within fp16 for |x| < 65504 (x itself must be an fp16 number); the partial sums over one program's
        # K stay short (a few dozen products).
        C: tl.constexpr = BLOCK_K // 4
        pid = tl.program_id(0)
        m, rn, rn_in = row_block(M, N, BLOCK_N, GLU, ROPE_D)
        w_off, k_lo, k_hi, k_pos, w = int8_word_tile(w_ptr, rn_in, stride_wn, K, BLOCK_N, BLOCK_K, EVEN_K, SPLIT)
        x_off, xk_pos = int8_x_tile(C, 2, EVEN_K)                                # [C, 2]: x word 2c + i (bf16 pairs)
        x_row = x_ptr + m * stride_xm  # x as int32 words [M, K/2]: stride in words
        if PDL:
            tl.extra.cuda.gdc_wait()
        r, cos, sin = epilogue_operands(r_ptr, cos_ptr, sin_ptr, m, N, rn, stride_ym, GLU, RES, ROPE_D)
        if NORM:
            rstd = rms_rstd(x_row, K, eps, True, NORM_K)
        if ASM:
            acc = tl.zeros((BLOCK_N, C), tl.int32)  # two fp16 partial sums a word
        else:
            acc = tl.zeros((BLOCK_N, C), tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if AHEAD > 0:
                k_next = k0 + BLOCK_K
                w_next = word_tile_at(w_ptr, w_off, k_pos, k_next, k_hi)
            else:
                w = word_tile_at(w_ptr, w_off, k_pos, k0, k_hi)
            if EVEN_K:
                xw = tl.load(x_row + k0 // 2 + x_off)                             # [C, 2] int32
                if NORM:
                    xw = rms_scale_pairs(xw, tl.load(g_ptr + k0 // 2 + x_off), rstd, ASM)
            else:
                xw = tl.load(x_row + k0 // 2 + x_off, mask=xk_pos + k0 < k_hi, other=0)
                if NORM:
                    xw = rms_scale_pairs(xw, tl.load(g_ptr + k0 // 2 + x_off, mask=xk_pos + k0 < k_hi, other=0), rstd, ASM)
            x01, x23 = tl.split(xw)                                               # [C] each
            if ASM:
                # bf16 pair -> fp16 pair: each half to fp32 bits, then one packing conversion
                x01, x23 = tl.inline_asm_elementwise(
                    "{ .reg .b32 a, b, c, d; shl.b32 a, $2, 16; and.b32 b, $2, 0xFFFF0000; cvt.rn.f16x2.f32 $0, b, a; "
                    "shl.b32 c, $3, 16; and.b32 d, $3, 0xFFFF0000; cvt.rn.f16x2.f32 $1, d, c; }",
                    "=r,=r,r,r", [x01, x23], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
                acc = tl.inline_asm_elementwise(
                    "{ .reg .b32 u, t0, t1, a, s, z; mov.b32 s, 0x24002400; mov.b32 z, 0xCC80CC80; "
                    "xor.b32 u, $1, 0x80808080; prmt.b32 t0, u, 0x64646464, 0x5140; prmt.b32 t1, u, 0x64646464, 0x7362; "
                    "fma.rn.f16x2 t0, t0, s, z; fma.rn.f16x2 t1, t1, s, z; "
                    "fma.rn.f16x2 a, t0, $2, $4; fma.rn.f16x2 $0, t1, $3, a; }",
                    "=r,r,r,r,r", [w, x01[None, :], x23[None, :], acc], dtype=tl.int32, is_pure=True, pack=1)
            else:  # the interpreter has no PTX: the same sums in fp32
                x0 = (x01 << 16).to(tl.float32, bitcast=True)
                x1 = (x01 & -65536).to(tl.float32, bitcast=True)
                x2 = (x23 << 16).to(tl.float32, bitcast=True)
                x3 = (x23 & -65536).to(tl.float32, bitcast=True)
                acc += ((w << 24) >> 24).to(tl.float32) * x0[None, :]
                acc += ((w << 16) >> 24).to(tl.float32) * x1[None, :]
                acc += ((w << 8) >> 24).to(tl.float32) * x2[None, :]
                acc += (w >> 24).to(tl.float32) * x3[None, :]
            if AHEAD > 0:
                w = w_next
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if ASM:  # the two fp16 halves of each word's sums, to fp32, times 64
            lo = (acc & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (acc >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            y = tl.sum(lo + hi, axis=1) * 64.0
        else:
            y = tl.sum(acc, axis=1)
        store_row_block(y, y_ptr, s_ptr, part_ptr, count_ptr, pid, tl.program_id(1), m, M, N, rn, rn_in, stride_ym,
                        SPLIT, True, GLU, RES, r, ROPE_D, cos, sin, rope_rows)

    @triton.jit
    def int4_fma_kernel(x_ptr, p_ptr, sz_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_pn, stride_szn,
                        stride_ym, F128, F2048, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                        AHEAD: tl.constexpr, PEEL: tl.constexpr, PDL: tl.constexpr, GLU: tl.constexpr = False,
                        NORM: tl.constexpr = False, RES: tl.constexpr = False, g_ptr=None, r_ptr=None, eps=0.0,
                        NORM_K: tl.constexpr = 0, NORM_ASM: tl.constexpr = False, ROPE_D: tl.constexpr = 0,
                        cos_ptr=None, sin_ptr=None, rope_rows=0):
        # p: int32 words [N, K/8], code 8w+j in bits 4j..4j+3; sz: int32 [N, K/G], scale bits low, zero high.
        # Program (block of BN rows of W, row m of x) x split s: groups s*per .. (s+1)*per - 1, one group a
        # step (words [BN, W], W = G/8: a thread holds a few rows of the same words, so each x it loads
        # serves all of them). F128 = 0x43000000, F2048 = 0x45000000 arrive as runtime values so that
        # (v & mask) | F is one LOP3 (ptxas takes one immediate per instruction).
        W: tl.constexpr = GROUP // 8
        pid = tl.program_id(0)
        s = tl.program_id(1)
        m, rn, rn_in = row_block(M, N, BLOCK_N, GLU, ROPE_D)
        rw = tl.arange(0, W)
        x_row = x_ptr + m * stride_xm
        # the first groups' words and scales load while the previous kernel (which writes x) still runs; each
        # step then loads group g + AHEAD before computing group g (AHEAD + 1 groups in flight per program);
        # nothing past the split's end
        p_off, sz_row, g_lo, g_hi, tile0, row0, words, sz = int4_group_tile(
            p_ptr, sz_ptr, rn_in, stride_pn, stride_szn, K, GROUP, BLOCK_N, SPLIT)
        if AHEAD == 2:
            words2 = tl.load(p_ptr + (g_lo + 1) * W + p_off, mask=tile0 + g_lo + 1 < g_hi, other=0)
            sz2 = tl.load(sz_row + g_lo + 1, mask=row0 + g_lo + 1 < g_hi, other=0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        r, cos, sin = epilogue_operands(r_ptr, cos_ptr, sin_ptr, m, N, rn, stride_ym, GLU, RES, ROPE_D)
        if NORM:
            rstd = rms_rstd(x_row, K, eps, False, NORM_K)
        acc = tl.zeros((BLOCK_N, W), tl.float32)
        zacc = tl.zeros((BLOCK_N,), tl.float32)
        for g in range(g_lo, g_hi):
            g_next = g + AHEAD
            next_words = tl.load(p_ptr + g_next * W + p_off, mask=tile0 + g_next < g_hi, other=0)
            next_sz = tl.load(sz_row + g_next, mask=row0 + g_next < g_hi, other=0)
            # nibble j moved to bits 16..19 reads as 128 + q in fp32 (| F128), to bits 12..15 as 2048 + q
            # (| F2048): four shifts place all eight
            hi8 = words >> 8
            lo8 = words << 8
            xv = tl.zeros((W,), tl.float32)    # per word: sum of its 8 x
            cx = tl.zeros((W,), tl.float32)    # per word: sum of its 8 (128 or 2048) x
            part = tl.zeros((BLOCK_N, W), tl.float32)
            # x of the group as [W, 8] (16-byte loads), split into its 8 columns xs[j] = x[8w + j], [W] each
            xt = tl.load(x_row + g * GROUP + 8 * rw[:, None] + tl.arange(0, 8)[None, :])
            if NORM:
                xt = rms_scale(xt, tl.load(g_ptr + g * GROUP + 8 * rw[:, None] + tl.arange(0, 8)[None, :]), rstd, NORM_ASM)
            xt = xt.to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(xt, (W, 4, 2)))                  # j = 0, 2, 4, 6 / 1, 3, 5, 7
            x04, x26 = tl.split(tl.reshape(x_even, (W, 2, 2)))                  # [W, 2]: j = 0, 4 / 2, 6
            x15, x37 = tl.split(tl.reshape(x_odd, (W, 2, 2)))
            x0, x4 = tl.split(x04)
            x2, x6 = tl.split(x26)
            x1, x5 = tl.split(x15)
            x3, x7 = tl.split(x37)
            for j in tl.static_range(8):
                xj = (x0, x1, x2, x3, x4, x5, x6, x7)[j]
                if j == 0:
                    v = ((words << 16) & 0x000F0000) | F128
                elif j == 1:
                    v = (lo8 & 0x0000F000) | F2048
                elif j == 2:
                    v = (lo8 & 0x000F0000) | F128
                elif j == 3:
                    v = (words & 0x0000F000) | F2048
                elif j == 4:
                    v = (words & 0x000F0000) | F128
                elif j == 5:
                    v = (hi8 & 0x0000F000) | F2048
                elif j == 6:
                    v = (hi8 & 0x000F0000) | F128
                else:
                    v = ((words >> 16) & 0x0000F000) | F2048
                part += v.to(tl.float32, bitcast=True) * xj[None, :]
                xv += xj
                cx += (2048.0 if j % 2 == 1 else 128.0) * xj
            # sum_k w_k x_k = s (part - sum cx) + (z - 8 s) sum x, with w = (q - 8) s + z
            scale = (sz << 16).to(tl.float32, bitcast=True)
            zero = (sz & -65536).to(tl.float32, bitcast=True)
            acc += scale[:, None] * part
            zacc += (zero - 8.0 * scale) * tl.sum(xv, axis=0) - scale * tl.sum(cx, axis=0)
            if AHEAD == 2:
                words, sz, words2, sz2 = words2, sz2, next_words, next_sz
            else:
                words, sz = next_words, next_sz
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        store_row_block(tl.sum(acc, axis=1) + zacc, y_ptr, sz_ptr, part_ptr, count_ptr, pid, s, m, M, N, rn, rn_in,
                        stride_ym, SPLIT, False, GLU, RES, r, ROPE_D, cos, sin, rope_rows)

    @triton.jit
    def int4_h2_kernel(x_ptr, p_ptr, sz_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_pn, stride_szn,
                       stride_ym, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                       AHEAD: tl.constexpr, ASM: tl.constexpr, PEEL: tl.constexpr, PDL: tl.constexpr,
                       GLU: tl.constexpr = False, NORM: tl.constexpr = False, RES: tl.constexpr = False, g_ptr=None,
                       r_ptr=None, eps=0.0, NORM_K: tl.constexpr = 0, NORM_ASM: tl.constexpr = False,
                       ROPE_D: tl.constexpr = 0, cos_ptr=None, sin_ptr=None, rope_rows=0, STAGES: tl.constexpr = 1):
        # int4_fma's tiles, splits and prefetch with the products in packed half precision (as int8_h2): x
        # read as int32 words of two bf16 ([M, K/2]) and made fp16 pairs (x[8w+j], x[8w+j+4]), j = 0..3; a
        # word's nibbles j and j + 4 become the fp16 pair 1024 + q (or 1024 + 16 q for the odd ones, left in
        # place) with one LOP3, then (q - 8) / 16 exactly with one fp16x2 FMA; four fp16x2 FMAs add the word's
        # eight products into its pair of fp16 sums (an int32), which one more FMA a group scales by 16 *
        # scale into the running pair. The zeros' part, zero * sum(x) per group, stays in fp32.
        W: tl.constexpr = GROUP // 8
        pid = tl.program_id(0)
        s = tl.program_id(1)
        m, rn, rn_in = row_block(M, N, BLOCK_N, GLU, ROPE_D)
        x_off = 4 * tl.arange(0, W)[:, None] + tl.arange(0, 4)[None, :]          # [W, 4]: x word 4w + i
        x_row = x_ptr + m * stride_xm                                             # x as int32 words
        p_off, sz_row, g_lo, g_hi, tile0, row0, words, sz = int4_group_tile(
            p_ptr, sz_ptr, rn_in, stride_pn, stride_szn, K, GROUP, BLOCK_N, SPLIT)
        if PDL:
            tl.extra.cuda.gdc_wait()
        r, cos, sin = epilogue_operands(r_ptr, cos_ptr, sin_ptr, m, N, rn, stride_ym, GLU, RES, ROPE_D)
        if NORM:
            rstd = rms_rstd(x_row, K, eps, True, NORM_K)
        if ASM:
            acc = tl.zeros((BLOCK_N, W), tl.int32)  # a pair of fp16 sums a word, over the groups so far
        else:
            acc = tl.zeros((BLOCK_N, W), tl.float32)
        zacc = tl.zeros((BLOCK_N,), tl.float32)
        # STAGES > 1 (AHEAD 0, "int4_h2p"): Triton's pipeliner brings the next STAGES - 1 groups' words and scales
        # into shared memory with cp.async, in flight without holding registers
        for g in tl.range(g_lo, g_hi, num_stages=STAGES):
            if AHEAD > 0:
                next_words = tl.load(p_ptr + (g + 1) * W + p_off, mask=tile0 + g + 1 < g_hi, other=0)
                next_sz = tl.load(sz_row + g + 1, mask=row0 + g + 1 < g_hi, other=0)
            else:
                words = tl.load(p_ptr + g * W + p_off)
                sz = tl.load(sz_row + g)
            xw = tl.load(x_row + g * (GROUP // 2) + x_off)                       # [W, 4]: (x[8w+2i], x[8w+2i+1])
            if NORM:
                xw = rms_scale_pairs(xw, tl.load(g_ptr + g * (GROUP // 2) + x_off), rstd, ASM)
            xa, xb = tl.split(tl.reshape(xw, (W, 2, 2)))                          # [W, 2]: i = 0, 2 / 1, 3
            xw0, xw2 = tl.split(xa)
            xw1, xw3 = tl.split(xb)
            pair_sums = (xw << 16).to(tl.float32, bitcast=True) + (xw & -65536).to(tl.float32, bitcast=True)  # [W, 4]
            x_sum = tl.sum(tl.sum(pair_sums, axis=1), axis=0)
            scale = (sz << 16).to(tl.float32, bitcast=True)
            zero = (sz & -65536).to(tl.float32, bitcast=True)
            zacc += zero * x_sum
            if ASM:
                x0, x1, x2, x3 = x_f16_quads(xw0, xw1, xw2, xw3, True)             # [W]: fp16 (x[8w+j], x[8w+j+4])
                part = tl.inline_asm_elementwise(
                    "{ .reg .b32 a, b, c, d, h, m, f, s0, z0, s1, z1; mov.b32 m, 0x000F000F; mov.b32 f, 0x64006400; "
                    "mov.b32 s0, 0x2C002C00; mov.b32 z0, 0xD408D408; mov.b32 s1, 0x1C001C00; mov.b32 z1, 0xC480C480; "
                    "shr.b32 h, $1, 8; lop3.b32 a, $1, m, f, 0xEA; lop3.b32 c, h, m, f, 0xEA; "
                    "shl.b32 m, m, 4; lop3.b32 b, $1, m, f, 0xEA; lop3.b32 d, h, m, f, 0xEA; "
                    "fma.rn.f16x2 a, a, s0, z0; fma.rn.f16x2 b, b, s1, z1; fma.rn.f16x2 c, c, s0, z0; "
                    "fma.rn.f16x2 d, d, s1, z1; mul.rn.f16x2 h, a, $2; fma.rn.f16x2 h, b, $3, h; "
                    "fma.rn.f16x2 h, c, $4, h; fma.rn.f16x2 $0, d, $5, h; }",
                    "=r,r,r,r,r,r", [words, x0[None, :], x1[None, :], x2[None, :], x3[None, :]], dtype=tl.int32,
                    is_pure=True, pack=1)
                s16 = tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $1;", "=r,r", [scale * 16.0],
                                                dtype=tl.int32, is_pure=True, pack=1)  # [BN]
                acc = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                                [part, s16[:, None] + tile0, acc], dtype=tl.int32, is_pure=True,
                                                pack=1)
            else:  # the interpreter has no PTX: the same sums in fp32
                part = tl.zeros((BLOCK_N, W), tl.float32)
                for j in tl.static_range(8):
                    xwj = (xw0, xw0, xw1, xw1, xw2, xw2, xw3, xw3)[j]
                    if j % 2 == 0:
                        xj = (xwj << 16).to(tl.float32, bitcast=True)
                    else:
                        xj = (xwj & -65536).to(tl.float32, bitcast=True)
                    part += (((words >> (4 * j)) & 0xF) - 8).to(tl.float32) * xj[None, :]
                acc += part * scale[:, None]
            if AHEAD > 0:
                words, sz = next_words, next_sz
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if ASM:  # the two fp16 halves of each word's sums, to fp32
            lo = (acc & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (acc >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            y = tl.sum(lo + hi, axis=1) + zacc
        else:
            y = tl.sum(acc, axis=1) + zacc
        store_row_block(y, y_ptr, sz_ptr, part_ptr, count_ptr, pid, s, m, M, N, rn, rn_in, stride_ym, SPLIT, False, GLU,
                        RES, r, ROPE_D, cos, sin, rope_rows)

    @triton.jit
    def int4_dot_kernel(x_ptr, p_ptr, sz_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_szn, stride_ym,
                        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
        # p: uint8 [N, K/2] (pack_nibbles), one group of columns per step:
        # part [BN, BM] = (128 + q_even) @ x_even^T + (128 + q_odd) @ x_odd^T, then scale and zero.
        H: tl.constexpr = GROUP // 2
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_in = tl.minimum(rn, N - 1)
        rm = tl.arange(0, BLOCK_M)
        rm_in = tl.minimum(rm, M - 1)
        p_off = rn_in[:, None].to(tl.int64) * stride_pn + tl.arange(0, H)[None, :]     # [BN, H] bytes
        x_off = rm_in[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]               # [BM, G]
        sz_off = rn_in.to(tl.int64) * stride_szn                                         # [BN]
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for g in tl.range(0, K // GROUP, num_stages=STAGES):
            p = tl.load(p_ptr + g * H + p_off)
            lo = ((p & 0xF).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)  # bf16 128 + q, exact
            hi = ((p >> 4).to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
            x = tl.load(x_ptr + g * GROUP + x_off)                                       # [BM, G]
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, H, 2)))                     # [BM, H] each
            part = tl.dot(lo, tl.trans(x_even))
            part = tl.dot(hi, tl.trans(x_odd), part)
            xs = tl.sum(x.to(tl.float32), axis=1)                                        # [BM]
            sz = tl.load(sz_ptr + g + sz_off)
            s = (sz << 16).to(tl.float32, bitcast=True)
            z = (sz & -65536).to(tl.float32, bitcast=True)
            acc += part * s[:, None] + (z - 136.0 * s)[:, None] * xs[None, :]
        y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))

    @triton.jit
    def glu_kernel(y_ptr, out_ptr, HALF, stride_ym, stride_om, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # out[m, j] = SiLU(y[m, j]) * y[m, HALF + j]: SwiGLU behind a matmul without the GLU epilogue (dot, cuBLAS)
        m = tl.program_id(1)
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if PDL:  # after the matmul: let the next kernel (down_proj) launch and read its first W tiles meanwhile
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        g = tl.load(y_ptr + m * stride_ym + j, mask=j < HALF, other=0.0).to(tl.float32)
        u = tl.load(y_ptr + m * stride_ym + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + j, silu_up(g, u, out_ptr.dtype.element_ty), mask=j < HALF)

    @triton.jit
    def int4_dequant_kernel(p_ptr, sz_ptr, w_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        # w bf16 [N, K] = (q - 8) * scale + zero, for prefill; p uint8 [N, K/2], sz bf16 [N, K/G, 2]
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        byte = tl.load(p_ptr + rn[:, None].to(tl.int64) * (K // 2) + rk[None, :] // 2, mask=mask, other=0)
        q = tl.where(rk[None, :] % 2 == 0, byte & 0xF, byte >> 4).to(tl.float32)
        sz = sz_ptr + rn[:, None].to(tl.int64) * (K // GROUP * 2) + (rk[None, :] // GROUP) * 2
        s = tl.load(sz, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(sz + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], ((q - 8) * s + z).to(tl.bfloat16), mask=mask)

    @triton.jit
    def mma_final(v0, v1, v2, v3, m0, n_a, n_b, na_in, nb_in, y_ptr, s_ptr, M, N, stride_ym, GLU: tl.constexpr):
        # one tile of the mma kernels' sums, [32] each: v0 / v1 = rows n_a of W by rows m0 / m0 + 1 of x, v2 / v3
        # = rows n_b; times the row's scale (none: int4, scaled per group), stored as bf16. GLU: n_a is gate row
        # j and n_b up row N / 2 + j (mma_tiles), so column j of y [M, N / 2] gets SiLU(gate) * up
        m1 = m0 + 1
        if s_ptr is None:
            s_a, s_b = 1.0, 1.0
        else:
            s_a = tl.load(s_ptr + na_in).to(tl.float32)
            s_b = tl.load(s_ptr + nb_in).to(tl.float32)
        ty = y_ptr.dtype.element_ty
        if GLU:
            tl.store(y_ptr + m0 * stride_ym + n_a, silu_up(v0 * s_a, v2 * s_b, ty), mask=(m0 < M) & (n_a < N // 2))
            tl.store(y_ptr + m1 * stride_ym + n_a, silu_up(v1 * s_a, v3 * s_b, ty), mask=(m1 < M) & (n_a < N // 2))
        else:
            tl.store(y_ptr + m0 * stride_ym + n_a, (v0 * s_a).to(ty), mask=(m0 < M) & (n_a < N))
            tl.store(y_ptr + m1 * stride_ym + n_a, (v1 * s_a).to(ty), mask=(m1 < M) & (n_a < N))
            tl.store(y_ptr + m0 * stride_ym + n_b, (v2 * s_b).to(ty), mask=(m0 < M) & (n_b < N))
            tl.store(y_ptr + m1 * stride_ym + n_b, (v3 * s_b).to(ty), mask=(m1 < M) & (n_b < N))

    @triton.jit
    def mma_partials(v0, v1, v2, v3, m0, n_a, n_b, part_ptr, split, M, N, LOAD: tl.constexpr):
        # a K split's partial sums of one tile in the workspace: stored as split number `split` (LOAD False)
        # or, by the last program, the sums of all `split` splits returned (LOAD True; v0..v3 unused)
        m1 = m0 + 1
        if LOAD:
            v0, v1, v2, v3 = tl.zeros_like(n_a).to(tl.float32), tl.zeros_like(n_a).to(tl.float32), \
                tl.zeros_like(n_a).to(tl.float32), tl.zeros_like(n_a).to(tl.float32)
            for t in tl.static_range(split):
                v0 += tl.load(part_ptr + (t * M + m0) * N + n_a, mask=(m0 < M) & (n_a < N), other=0.0,
                              cache_modifier=".cg")
                v1 += tl.load(part_ptr + (t * M + m1) * N + n_a, mask=(m1 < M) & (n_a < N), other=0.0,
                              cache_modifier=".cg")
                v2 += tl.load(part_ptr + (t * M + m0) * N + n_b, mask=(m0 < M) & (n_b < N), other=0.0,
                              cache_modifier=".cg")
                v3 += tl.load(part_ptr + (t * M + m1) * N + n_b, mask=(m1 < M) & (n_b < N), other=0.0,
                              cache_modifier=".cg")
        else:
            tl.store(part_ptr + (split * M + m0) * N + n_a, v0, mask=(m0 < M) & (n_a < N))
            tl.store(part_ptr + (split * M + m1) * N + n_a, v1, mask=(m1 < M) & (n_a < N))
            tl.store(part_ptr + (split * M + m0) * N + n_b, v2, mask=(m0 < M) & (n_b < N))
            tl.store(part_ptr + (split * M + m1) * N + n_b, v3, mask=(m1 < M) & (n_b < N))
        return v0, v1, v2, v3

    globals().update(mma_final=mma_final, mma_partials=mma_partials)

    @triton.jit
    def mma_words(w_ptr, k, w_offs, w_col, k_hi, T: tl.constexpr, Q: tl.constexpr, EVEN_K: tl.constexpr,
                  PER: tl.constexpr):
        # the mma kernels' words of the step at column k (PER columns a word: 4 int8 codes, 2 bf16): 2 T Q
        # tensors [32, 4] (16 bytes a lane), masked past k_hi only for a ragged K
        ws = ()
        for i in tl.static_range(2 * T * Q):
            ptrs = w_ptr + k // PER + 4 * (i % Q) + w_offs[i // Q]
            if EVEN_K:
                ws = ws + (tl.load(ptrs),)
            else:
                ws = ws + (tl.load(ptrs, mask=w_col + 4 * PER * (i % Q) + k < k_hi, other=0),)
        return ws

    @triton.jit
    def mma_first_words(w_ptr, k_lo, k_hi, w_offs, w_col, T: tl.constexpr, Q: tl.constexpr, EVEN_K: tl.constexpr,
                        PER: tl.constexpr, STEP: tl.constexpr, AHEAD: tl.constexpr):
        # the words of a program's first step (and, two steps ahead, its second), loaded before PDL's wait (W is
        # never written; PEEL is implied). Unmasked (whole steps), a load past the split's end re-reads its last
        # step, or K's for an empty split (k_hi = K < k_lo), and adds nothing.
        ws = mma_words(w_ptr, tl.minimum(k_lo, k_hi - STEP) if EVEN_K else k_lo, w_offs, w_col, k_hi, T, Q, EVEN_K, PER)
        if AHEAD == 2:
            ws2 = mma_words(w_ptr, tl.minimum(k_lo + STEP, k_hi - STEP) if EVEN_K else k_lo + STEP, w_offs, w_col,
                            k_hi, T, Q, EVEN_K, PER)
        else:
            ws2 = ws
        return ws, ws2

    @triton.jit
    def mma_next_words(w_ptr, k0, k_hi, w_offs, w_col, T: tl.constexpr, Q: tl.constexpr, EVEN_K: tl.constexpr,
                       PER: tl.constexpr, STEP: tl.constexpr, AHEAD: tl.constexpr):
        # the words AHEAD steps on from the step at column k0 (0: this step's)
        k_next = k0 + AHEAD * STEP
        if EVEN_K:
            k_next = tl.minimum(k_next, k_hi - STEP)
        return mma_words(w_ptr, k_next, w_offs, w_col, k_hi, T, Q, EVEN_K, PER)

    @triton.jit
    def mma_zeros(N: tl.constexpr):
        # N fp32 sums [32], one register a lane each
        acc = ()
        for i in tl.static_range(N):
            acc = acc + (tl.zeros((32,), tl.float32),)
        return acc

    @triton.jit
    def mma_quads(ws, q, T: tl.constexpr, Q: tl.constexpr):
        # words 4q..4q + 3 of rows g, g + 8 of each tile out of a step's words ws (mma_words): four [32] each,
        # index 2t + h
        wq = ()
        for i in tl.static_range(2 * T):
            wq = wq + (unstack4(ws[i * Q + q]),)
        return wq

    @triton.jit
    def mma_rotate(ws, ws2, ws_next, AHEAD):
        # after a step of the mma kernels: the words for the next step (AHEAD 2: the second-next moves up).
        # AHEAD arrives as the kernel's constexpr; annotated here, Triton 3.6 fails to resolve `tl` in it
        if AHEAD == 2:
            ws, ws2 = ws2, ws_next
        elif AHEAD == 1:
            ws = ws_next
        return ws, ws2

    @triton.jit
    def mma_tiles(pid, g, word, N, stride_wn, BLOCK_N: tl.constexpr, T: tl.constexpr, GLU: tl.constexpr):
        # the mma kernels' T tiles of 16 rows of W: word offsets 2t, 2t + 1 of rows g and g + 8 of tile t
        # (word: the lane's [32, 4] words of a row), and rows 4t..4t + 3 (n_a = g, n_b = g + 8, both clamped
        # into W for loads). GLU (W = [gate; up]): a tile's rows g are gate row j = pid * BLOCK_N / 2 + 8t + g
        # and its rows g + 8 up row N / 2 + j, so each lane holds both halves of its outputs; n_a, n_b are N
        # (masked) past the last pair
        w_offs = ()
        rows = ()
        for t in tl.static_range(T):
            if GLU:
                half = N // 2
                j = pid * (BLOCK_N // 2) + 8 * t + g                                # [32]
                n_a, n_b = tl.where(j < half, j, N), tl.where(j < half, half + j, N)
                na_in = tl.minimum(j, half - 1)
                nb_in = na_in + half
            else:
                n_a = pid * BLOCK_N + 16 * t + g                                   # [32]
                n_b = n_a + 8
                na_in, nb_in = tl.minimum(n_a, N - 1), tl.minimum(n_b, N - 1)
            w_offs = w_offs + (na_in[:, None].to(tl.int64) * stride_wn + word,
                               nb_in[:, None].to(tl.int64) * stride_wn + word)
            rows = rows + (n_a, n_b, na_in, nb_in)
        return w_offs, rows

    @triton.jit
    def mma_store(out, rows, m0, y_ptr, s_ptr, part_ptr, count_ptr, pid, M, N, stride_ym, T: tl.constexpr,
                  SPLIT: tl.constexpr, GLU: tl.constexpr):
        # the mma kernels' sums out (4 a tile: rows n_a, n_b of W by rows m0, m0 + 1 of x) stored through
        # mma_final, or with a K split through the workspace, the last of the SPLIT programs of this block
        # adding them up (as store_row_block)
        if SPLIT == 1:
            for t in tl.static_range(T):
                mma_final(out[4 * t], out[4 * t + 1], out[4 * t + 2], out[4 * t + 3], m0, rows[4 * t], rows[4 * t + 1],
                          rows[4 * t + 2], rows[4 * t + 3], y_ptr, s_ptr, M, N, stride_ym, GLU)
        else:
            for t in tl.static_range(T):
                mma_partials(out[4 * t], out[4 * t + 1], out[4 * t + 2], out[4 * t + 3], m0, rows[4 * t],
                             rows[4 * t + 1], part_ptr, tl.program_id(1), M, N, False)
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
            if done == SPLIT - 1:
                for t in tl.static_range(T):
                    v0, v1, v2, v3 = mma_partials(out[4 * t], out[4 * t + 1], out[4 * t + 2], out[4 * t + 3], m0,
                                                  rows[4 * t], rows[4 * t + 1], part_ptr, SPLIT, M, N, True)
                    mma_final(v0, v1, v2, v3, m0, rows[4 * t], rows[4 * t + 1], rows[4 * t + 2], rows[4 * t + 3],
                              y_ptr, s_ptr, M, N, stride_ym, GLU)
                tl.atomic_xchg(count_ptr + pid, 0)

    globals().update(mma_words=mma_words, mma_first_words=mma_first_words, mma_next_words=mma_next_words,
                     mma_zeros=mma_zeros, mma_quads=mma_quads, mma_rotate=mma_rotate, mma_tiles=mma_tiles,
                     mma_store=mma_store)

    @triton.jit
    def int8_mma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        BLOCK_N: tl.constexpr, WPL: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                        AHEAD: tl.constexpr, ASM: tl.constexpr, PEEL: tl.constexpr, PDL: tl.constexpr,
                        GLU: tl.constexpr = False):
        # y = x @ (w * s)^T on tensor cores for 1..8 rows of x (B's columns), one warp a program: T = BN / 16
        # tiles of 16 rows of W. w int8 [N, K] as int32 words [N, K/4], x as bf16 pairs [M, K/2]. A step
        # takes 16 * WPL columns: lane (g, c) loads WPL consecutive words (4 WPL codes) of rows g and g + 8 of
        # each tile, 16 bytes at a time, and the 4 WPL x's they multiply; each word pair (rows g, g + 8) is
        # one mma. Codes enter as fp16 1152 + q (int8_f16_pairs), so y = s * (sum (1152 + q) x - 1152 sum x):
        # one more mma a word with A = 1152 everywhere gives the second sum in the same lanes' layout.
        T: tl.constexpr = BLOCK_N // 16
        Q: tl.constexpr = WPL // 4                                                 # 16-byte loads a row a step
        STEP: tl.constexpr = 16 * WPL
        pid = tl.program_id(0)
        lane = tl.arange(0, 32)
        g = lane // 4
        c = lane % 4
        word = WPL * c[:, None] + tl.arange(0, 4)[None, :]                        # [32, 4]: a lane's first 4 words
        pair = 2 * WPL * c[:, None] + tl.arange(0, 4)[None, :]                    # [32, 4]: their first 4 x pairs
        x_off = tl.minimum(g, M - 1)[:, None] * stride_xm + pair                  # B's column g is x's row g
        k_lo, k_hi = k_range(K, STEP, SPLIT)
        if EVEN_K:
            w_col, x_col = tl.zeros_like(word), tl.zeros_like(pair)
        else:  # a ragged K (K % 4 == 0): masks per word and per x pair, from their first column
            w_col, x_col = 4 * word, 2 * pair
        w_offs, rows = mma_tiles(pid, g, word, N, stride_wn, BLOCK_N, T, GLU)
        # [32, 4] words: index (2t + h) * Q + q = tile t, rows g (h = 0) / g + 8 (h = 1), words 4q..4q + 3
        ws, ws2 = mma_first_words(w_ptr, k_lo, k_hi, w_offs, w_col, T, Q, EVEN_K, 4, STEP, AHEAD)
        if PDL:
            tl.extra.cuda.gdc_wait()
        acc = mma_zeros(4 * T)
        cor0 = tl.zeros((32,), tl.float32)
        cor1 = tl.zeros((32,), tl.float32)
        cor2 = tl.zeros((32,), tl.float32)
        cor3 = tl.zeros((32,), tl.float32)
        k1152 = tl.full((32,), 0x64806480, tl.int32)                               # fp16 (1152, 1152)
        for k0 in range(k_lo, k_hi, STEP):
            ws_next = mma_next_words(w_ptr, k0, k_hi, w_offs, w_col, T, Q, EVEN_K, 4, STEP, AHEAD)
            if AHEAD == 0:
                ws = ws_next
            for q in tl.static_range(Q):
                # x pairs of words 4q, 4q + 1 and 4q + 2, 4q + 3: (x[k], x[k+1]), (x[k+2], x[k+3]) a word
                xlo = unstack4(tl.load(x_ptr + k0 // 2 + 8 * q + x_off,
                                       mask=None if EVEN_K else x_col + 16 * q + k0 < k_hi,
                                       other=None if EVEN_K else 0))
                xhi = unstack4(tl.load(x_ptr + k0 // 2 + 8 * q + 4 + x_off,
                                       mask=None if EVEN_K else x_col + 16 * q + 8 + k0 < k_hi,
                                       other=None if EVEN_K else 0))
                xs = xlo + xhi
                wq = mma_quads(ws, q, T, Q)
                for jj in tl.static_range(4):  # word 4q + jj of the lane's run
                    b0, b1 = x_f16_pairs(xs[2 * jj], xs[2 * jj + 1], ASM)          # [32]
                    new_acc = ()
                    for t in tl.static_range(T):
                        a02, a13 = int8_f16_pairs(wq[2 * t][jj], ASM)              # rows g
                        b02, b13 = int8_f16_pairs(wq[2 * t + 1][jj], ASM)          # rows g + 8
                        d0, d1, d2, d3 = mma_16816(a02, b02, a13, b13, b0, b1, acc[4 * t], acc[4 * t + 1],
                                                   acc[4 * t + 2], acc[4 * t + 3], ASM)
                        new_acc = new_acc + (d0, d1, d2, d3)
                    acc = new_acc
                    cor0, cor1, cor2, cor3 = mma_16816(k1152, k1152, k1152, k1152, b0, b1, cor0, cor1, cor2, cor3, ASM)
            ws, ws2 = mma_rotate(ws, ws2, ws_next, AHEAD)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        # lane (g, c) holds columns m = 2c, 2c + 1 (rows of x) of rows n_a (acc 0, 1) and n_b (acc 2, 3)
        out = ()
        for t in tl.static_range(T):
            out = out + (acc[4 * t] - cor0, acc[4 * t + 1] - cor1, acc[4 * t + 2] - cor0, acc[4 * t + 3] - cor1)
        mma_store(out, rows, 2 * c, y_ptr, s_ptr, part_ptr, count_ptr, pid, M, N, stride_ym, T, SPLIT, GLU)

    @triton.jit
    def bf16_mma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        BLOCK_N: tl.constexpr, WPL: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                        AHEAD: tl.constexpr, ASM: tl.constexpr, PEEL: tl.constexpr, PDL: tl.constexpr,
                        GLU: tl.constexpr = False):
        # int8_mma's tiles and steps with bf16 W fed to the mma as loaded: w bf16 [N, K] and x bf16 [M, K], both
        # read as int32 words of two ([N, K/2], [M, K/2]). Lane (g, c) loads WPL consecutive words of rows g
        # and g + 8 of each tile (16 bytes at a time) and the same words of x's row g; two words of each
        # (four columns) are one mma's k-slots 2c, 2c + 1, 2c + 8, 2c + 9. No conversion, no correction; s_ptr
        # is None (no scales: int8_mma's signature, one launch for both).
        T: tl.constexpr = BLOCK_N // 16
        Q: tl.constexpr = WPL // 4                                                 # 16-byte loads a row a step
        STEP: tl.constexpr = 8 * WPL                                               # columns a step
        pid = tl.program_id(0)
        lane = tl.arange(0, 32)
        g = lane // 4
        c = lane % 4
        word = WPL * c[:, None] + tl.arange(0, 4)[None, :]                        # [32, 4]: a lane's first 4 words
        x_off = tl.minimum(g, M - 1)[:, None] * stride_xm + word                  # B's column g is x's row g
        k_lo, k_hi = k_range(K, STEP, SPLIT)
        if EVEN_K:
            w_col = tl.zeros_like(word)
        else:  # a ragged K (K % 2 == 0): masks per word, from its first column
            w_col = 2 * word
        w_offs, rows = mma_tiles(pid, g, word, N, stride_wn, BLOCK_N, T, GLU)
        ws, ws2 = mma_first_words(w_ptr, k_lo, k_hi, w_offs, w_col, T, Q, EVEN_K, 2, STEP, AHEAD)
        if PDL:
            tl.extra.cuda.gdc_wait()
        acc = mma_zeros(4 * T)
        for k0 in range(k_lo, k_hi, STEP):
            ws_next = mma_next_words(w_ptr, k0, k_hi, w_offs, w_col, T, Q, EVEN_K, 2, STEP, AHEAD)
            if AHEAD == 0:
                ws = ws_next
            for q in tl.static_range(Q):
                xq = unstack4(tl.load(x_ptr + k0 // 2 + 4 * q + x_off,                   # x words 4q..4q + 3
                                      mask=None if EVEN_K else w_col + 8 * q + k0 < k_hi,
                                      other=None if EVEN_K else 0))
                wq = mma_quads(ws, q, T, Q)
                for jj in tl.static_range(2):  # words 2jj, 2jj + 1: one mma
                    new_acc = ()
                    for t in tl.static_range(T):
                        d0, d1, d2, d3 = mma_16816(wq[2 * t][2 * jj], wq[2 * t + 1][2 * jj], wq[2 * t][2 * jj + 1],
                                                   wq[2 * t + 1][2 * jj + 1], xq[2 * jj], xq[2 * jj + 1],
                                                   acc[4 * t], acc[4 * t + 1], acc[4 * t + 2], acc[4 * t + 3], ASM, True)
                        new_acc = new_acc + (d0, d1, d2, d3)
                    acc = new_acc
            ws, ws2 = mma_rotate(ws, ws2, ws_next, AHEAD)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        mma_store(acc, rows, 2 * c, y_ptr, s_ptr, part_ptr, count_ptr, pid, M, N, stride_ym, T, SPLIT, GLU)

    @triton.jit
    def int4_mma_kernel(x_ptr, p_ptr, sz_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_pn, stride_szn,
                        stride_ym, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                        AHEAD: tl.constexpr, ONE_ROW: tl.constexpr, ASM: tl.constexpr, PEEL: tl.constexpr,
                        PDL: tl.constexpr, GLU: tl.constexpr = False):
        # int4 (words [N, K/8], scale|zero words [N, K/G]) on tensor cores as int8_mma_kernel, one group a
        # step: lane (g, c) loads WPL = G/32 consecutive words of rows g and g + 8 of each tile (one 16-byte
        # load at G = 128) and the x's of their 8 WPL columns. A word pair (rows g, g + 8) is two mmas: codes
        # 0, 4, 2, 6 as fp16 1024 + q and codes 1, 5, 3, 7 as 64 + q (int4_f16_pairs). Per group, C = sum of
        # those times x; two more mmas a word with constant A give, in the same lanes, cor = sum (1032 or 72) x
        # (rows g: the codes' offsets and the 8 of q - 8) and xs = sum x (rows g + 8: A = 1), so the group adds
        # scale * (C - cor) + zero * xs. ONE_ROW (M = 1): the odd columns (rows 1, 3, .. of x) are not summed.
        T: tl.constexpr = BLOCK_N // 16
        WPL: tl.constexpr = GROUP // 32
        pid = tl.program_id(0)
        lane = tl.arange(0, 32)
        g = lane // 4
        c = lane % 4
        word = WPL * c[:, None] + tl.arange(0, WPL)[None, :]                      # [32, WPL]: words of a group
        quad = 4 * WPL * c[:, None] + tl.arange(0, 4)[None, :]                    # [32, 4]: the first word's x pairs
        x_off = tl.minimum(g, M - 1)[:, None] * stride_xm + quad                  # B's column g is x's row g
        g_lo, g_hi = group_range(K, GROUP, SPLIT)
        w_offs, rows = mma_tiles(pid, g, word, N, stride_pn, BLOCK_N, T, GLU)
        sz_rows = ()  # the scale pointers of rows g, g + 8 of tile t: 2t, 2t + 1
        for t in tl.static_range(T):
            sz_rows = sz_rows + (sz_ptr + rows[4 * t + 2].to(tl.int64) * stride_szn,
                                 sz_ptr + rows[4 * t + 3].to(tl.int64) * stride_szn)
        # the first group's words and scales before PDL's wait (W is never written; PEEL is implied); an empty
        # split reads K's last group and adds nothing
        g_first = tl.maximum(tl.minimum(g_lo, g_hi - 1), 0)
        ws = ()
        szs = ()
        for i in tl.static_range(2 * T):
            ws = ws + (tl.load(p_ptr + g_first * (GROUP // 8) + w_offs[i]),)       # [32, WPL]
            szs = szs + (tl.load(sz_rows[i] + g_first),)                          # [32]
        if PDL:
            tl.extra.cuda.gdc_wait()
        y = mma_zeros(4 * T)
        k1032 = tl.full((32,), 0x64086408, tl.int32)                               # fp16 (1032, 1032)
        k72 = tl.full((32,), 0x54805480, tl.int32)                                 # fp16 (72, 72)
        one = tl.full((32,), 0x3C003C00, tl.int32)                                 # fp16 (1, 1)
        zero = tl.zeros((32,), tl.float32)
        for gi in range(g_lo, g_hi):
            g_next = tl.minimum(gi + 1, g_hi - 1) if AHEAD > 0 else gi             # the last group re-read, not masked
            ws_next = ()
            szs_next = ()
            for i in tl.static_range(2 * T):
                ws_next = ws_next + (tl.load(p_ptr + g_next * (GROUP // 8) + w_offs[i]),)
                szs_next = szs_next + (tl.load(sz_rows[i] + g_next),)
            if AHEAD == 0:
                ws = ws_next
                szs = szs_next
            cs = mma_zeros(4 * T)
            cor0, cor1, xs0, xs1 = zero, zero, zero, zero
            words = ()
            for i in tl.static_range(2 * T):
                words = words + (unstack(ws[i], WPL),)
            for j in tl.static_range(WPL):
                x01, x23, x45, x67 = unstack4(tl.load(x_ptr + gi * (GROUP // 2) + 4 * j + x_off))  # [32] each
                b04, b15, b26, b37 = x_f16_quads(x01, x23, x45, x67, ASM)
                new_cs = ()
                for t in tl.static_range(T):
                    a04, a15, a26, a37 = int4_f16_pairs(words[2 * t][j], ASM)       # rows g
                    e04, e15, e26, e37 = int4_f16_pairs(words[2 * t + 1][j], ASM)   # rows g + 8
                    d0, d1, d2, d3 = mma_16816(a04, e04, a26, e26, b04, b26, cs[4 * t], cs[4 * t + 1], cs[4 * t + 2],
                                               cs[4 * t + 3], ASM)
                    d0, d1, d2, d3 = mma_16816(a15, e15, a37, e37, b15, b37, d0, d1, d2, d3, ASM)
                    new_cs = new_cs + (d0, d1, d2, d3)
                cs = new_cs
                cor0, cor1, xs0, xs1 = mma_16816(k1032, one, k1032, one, b04, b26, cor0, cor1, xs0, xs1, ASM)
                cor0, cor1, xs0, xs1 = mma_16816(k72, one, k72, one, b15, b37, cor0, cor1, xs0, xs1, ASM)
            new_y = ()
            for t in tl.static_range(T):
                s_a = (szs[2 * t] << 16).to(tl.float32, bitcast=True)
                z_a = (szs[2 * t] & -65536).to(tl.float32, bitcast=True)
                s_b = (szs[2 * t + 1] << 16).to(tl.float32, bitcast=True)
                z_b = (szs[2 * t + 1] & -65536).to(tl.float32, bitcast=True)
                y0 = y[4 * t] + s_a * (cs[4 * t] - cor0) + z_a * xs0
                y2 = y[4 * t + 2] + s_b * (cs[4 * t + 2] - cor0) + z_b * xs0
                if ONE_ROW:
                    y1, y3 = y[4 * t + 1], y[4 * t + 3]
                else:
                    y1 = y[4 * t + 1] + s_a * (cs[4 * t + 1] - cor1) + z_a * xs1
                    y3 = y[4 * t + 3] + s_b * (cs[4 * t + 3] - cor1) + z_b * xs1
                new_y = new_y + (y0, y1, y2, y3)
            y = new_y
            if AHEAD > 0:
                ws = ws_next
                szs = szs_next
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        mma_store(y, rows, 2 * c, y_ptr, None, part_ptr, count_ptr, pid, M, N, stride_ym, T, SPLIT, GLU)

    return {"fma": fma_kernel, "dot": dot_kernel, "int8_fma": int8_fma_kernel, "int8_h2": int8_h2_kernel,
            "int8_mma": int8_mma_kernel, "int4_mma": int4_mma_kernel, "bf16_mma": bf16_mma_kernel,
            "int4_fma": int4_fma_kernel, "int4_h2": int4_h2_kernel, "int4_dot": int4_dot_kernel,
            "int4_dequant": int4_dequant_kernel, "glu": glu_kernel}


# ---------------------------------------------------------------- configs and the first-call tuner

def _cfg(kernel, block_n, block_k, warps, stages, split=1, ahead=0):
    return (kernel, block_n, block_k, warps, stages) + ((split, ahead) if (split, ahead) != (1, 0) else ())


# (kernel, BLOCK_N, BLOCK_K in weights, num_warps, num_stages[, K split, tiles loaded ahead]). A thread holds
# BLOCK_N * BLOCK_K / (32 * warps) fp32 partial sums in the fma kernels: <= 64 keeps registers (and so
# programs per SM) in check. Per row and step: BLOCK_K weights = 128..1024 bytes (bf16), 256..1024 (int8),
# 128..512 (int4).
# stages > 1: Triton turns the loop's loads into cp.async into shared memory, `stages - 1` tiles ahead.
# ahead 1 or 2 (fma, stages 1): the next tiles load into registers before this one's math.
# split > 1: SPLIT programs per block of rows, each over a K range; partial sums meet in an fp32 workspace
# and the last program adds them (N = 4096 shapes have few blocks: 64 programs of 64 rows).
_FMA_BF16 = [_cfg("fma", 8, 256, 4, 1), _cfg("fma", 16, 256, 4, 1), _cfg("fma", 8, 512, 4, 1),
             _cfg("fma", 16, 512, 8, 1), _cfg("fma", 4, 512, 4, 1), _cfg("fma", 8, 256, 4, 3),
             _cfg("fma", 16, 256, 4, 3)]
# int8 at one row: the configs within ~5% of the best on some llama-3-8b shape in the H200's in-graph timings
# (every candidate timed as time_in_graph does: bench.py gemv --all-configs), plus a K split for models whose
# N gives few programs. int8_h2 (fp16x2 products) is the fastest on every shape since it came; the first
# three (fp32 fma, also the candidates for 2..4 rows) and three more fp32 ones stay: the untimed default
# and the fp32 choice. The cp.async-pipelined fma configs (stages > 1) read only 0.17-0.30 of copy bandwidth.
_FMA_INT8 = [_cfg("fma", 16, 512, 4, 1), _cfg("fma", 8, 512, 4, 1), _cfg("fma", 8, 1024, 4, 1),
             _cfg("int8_fma", 16, 512, 4, 1), _cfg("int8_fma", 8, 2048, 4, 1), _cfg("fma_prmt", 8, 1024, 4, 1),
             _cfg("int8_h2", 16, 512, 4, 1), _cfg("int8_h2", 16, 512, 4, 1, 1, 1), _cfg("int8_h2", 16, 1024, 4, 1, 1, 1),
             _cfg("int8_h2", 8, 2048, 4, 1), _cfg("int8_h2", 8, 2048, 4, 1, 1, 1), _cfg("int8_h2", 8, 1024, 4, 1),
             _cfg("int8_h2", 8, 1024, 4, 1, 1, 1), _cfg("int8_h2", 8, 1024, 8, 1, 1, 1), _cfg("int8_h2", 4, 1024, 2, 1, 1, 1),
             _cfg("int8_h2", 8, 1024, 4, 1, 2, 1)]
_DOT = [_cfg("dot", 16, 256, 1, 3), _cfg("dot", 32, 256, 2, 3), _cfg("dot", 64, 128, 4, 4),
        _cfg("dot", 32, 128, 1, 4), _cfg("dot", 64, 256, 4, 3), _cfg("dot", 16, 256, 1, 3, 4),
        _cfg("dot", 32, 256, 2, 3, 2), _cfg("dot", 64, 128, 4, 4, 2), _cfg("dot", 32, 128, 1, 4, 4)]
# int4_fma: (kernel, BLOCK_N, K split, warps, groups loaded ahead): llama-3-8b's N = 4096 needs a split (32
# rows a program would be only 128 programs of one warp); a split's partial sums meet in an fp32 workspace.
# Kept: the configs within ~5% of the best on some llama-3-8b shape in the H200's in-graph timings since
# int4_h2 came (the first is the default and the M = 2..4 candidates with the next two).
_FMA_INT4 = [_cfg("int4_fma", 64, 8, 2, 1), _cfg("int4_fma", 32, 4, 1, 1), _cfg("int4_fma", 64, 2, 1, 2),
             _cfg("int4_fma", 32, 8, 1, 1), _cfg("int4_fma", 64, 8, 2, 2), _cfg("int4_fma", 64, 4, 1, 1)]
# int4_h2 (fp16x2 products), the same five numbers; ahead 0 or 1
_H2_INT4 = [_cfg("int4_h2", 64, 8, 2, 1), _cfg("int4_h2", 64, 2, 1, 1), _cfg("int4_h2", 32, 8, 1, 1),
            _cfg("int4_h2", 64, 4, 2, 1), _cfg("int4_h2", 64, 16, 2, 1), _cfg("int4_h2", 128, 8, 4, 1),
            _cfg("int4_h2", 64, 4, 1, 1), _cfg("int4_h2", 32, 16, 1, 1), _cfg("int4_h2", 128, 4, 4, 1),
            _cfg("int4_h2", 64, 8, 2, 0)]
# int4_h2p: int4_h2 with AHEAD 0 and its loop's loads pipelined by Triton (cp.async into shared memory, the fifth
# number the stages): offline (sm_90, Triton 3.6) 64/8/2 with 3 stages holds 79 registers instead of 128 and
# 9 KB of shared memory, so some 12 programs an SM keep two groups in flight each. Measured on the H200
# (.gpu/int4_probe2.py): gate_up 27.6-27.8 us against int4_h2's 28.0-28.6, slower on down (15.5 against 14.1),
# qkv and o_proj: not a candidate (FLINT_GEMV_PICKS can name it).
# int4_h2 with x loaded as two [W, 2] tiles in the words' layout (offline: 2 barriers a group instead of 7)
# was tried and measured slower on the H200 (llama-3-8b int4 g128 decode 457 against 478 tok/s, the same picks
# pinned: benchmarks/int4_x_pairs_ab.sh at 617153d); not kept
# int4_cu: cuda_kernels.int4_gemv (CUDA C++, one row of x): (kernel, rows of W a warp, column steps of 1024 loaded
# at once, warps a block, 1); candidates at one row where cuda_kernels.available() (a GPU and nvcc), K % 1024 == 0
# (else the last one only: the one instance built for a ragged K). Kept: the configs within ~5% of the best on some
# llama-3-8b int4 g128 shape on the H200 (benchmarks/int4_gemv_shapes.py); 2/2/8 is the untimed default.
_CU_INT4 = [_cfg("int4_cu", 2, 2, 8, 1), _cfg("int4_cu", 2, 2, 16, 1), _cfg("int4_cu", 2, 4, 8, 1),
            _cfg("int4_cu", 2, 4, 16, 1), _cfg("int4_cu", 4, 1, 8, 1), _cfg("int4_cu", 4, 1, 12, 1),
            _cfg("int4_cu", 4, 1, 16, 1), _cfg("int4_cu", 2, 1, 8, 1)]
_DOT_INT4 = [_cfg("int4_dot", 16, 0, 1, 4), _cfg("int4_dot", 32, 0, 2, 4), _cfg("int4_dot", 64, 0, 4, 4),
             _cfg("int4_dot", 32, 0, 1, 3)]
# int8_mma / int4_mma (tensor cores, 1..8 rows of x read W once): (kernel, BLOCK_N, columns a step (int8) or
# K split (int4), warps = 1, stages = 1 (int8) or groups loaded ahead (int4)[, K split, tiles ahead (int8)])
# Kept: the configs within ~5% of the best on some llama-3-8b shape at 8 rows in the H200's in-graph timings
# (.gpu/mma_sweep.py). At one row they lose to int8_h2 / int4_h2 on every shape (by 5-30%), so they are
# candidates from 2 rows.
_MMA_INT8 = [_cfg("int8_mma", 16, 128, 1, 1, 8, 1), _cfg("int8_mma", 32, 128, 1, 1, 8, 1),
             _cfg("int8_mma", 16, 128, 1, 1, 4, 1), _cfg("int8_mma", 16, 128, 1, 1, 2, 1),
             _cfg("int8_mma", 32, 128, 1, 1, 2, 1)]
_MMA_INT4 = [_cfg("int4_mma", 16, 8, 1, 1), _cfg("int4_mma", 32, 8, 1, 1), _cfg("int4_mma", 16, 4, 1, 1),
             _cfg("int4_mma", 128, 4, 1, 1), _cfg("int4_mma", 32, 2, 1, 1), _cfg("int4_mma", 16, 16, 1, 1)]
# bf16_mma (bf16 W as loaded, no conversion), the same numbers (columns a step = 8 * words a lane): within ~3%
# of the best on some llama-3-8b shape at 2, 4 or 8 rows on the H200 (.gpu/bf16_sweep.py); at one row the fma
# kernels win every shape
_MMA_BF16 = [_cfg("bf16_mma", 16, 64, 1, 1, 8, 1), _cfg("bf16_mma", 16, 64, 1, 1, 16, 1),
             _cfg("bf16_mma", 16, 64, 1, 1, 1, 1), _cfg("bf16_mma", 16, 64, 1, 1, 4, 1)]
# bf16_cu: cuda_kernels.bf16_mma (tiles of 16 rows a block, chunks of 32 columns a step, warps, 1), tensor cores at
# 2..8 rows with W and x as loaded (16 bytes a lane), all fusions, PDL; where nvcc and the GPU allow it
_CU_BF16 = [_cfg("bf16_cu", 1, 4, 8, 1), _cfg("bf16_cu", 2, 2, 8, 1), _cfg("bf16_cu", 1, 2, 8, 1),
            _cfg("bf16_cu", 2, 1, 8, 1), _cfg("bf16_cu", 4, 1, 8, 1), _cfg("bf16_cu", 1, 4, 4, 1),
            _cfg("bf16_cu", 2, 2, 4, 1)]
MMA_MAX_M = 8  # B's columns
FMA_MAX_M = 4  # fma kernels re-read W per row (from L2): candidates up to this many rows
NO_PDL_HANDICAP = 1.15  # see _pick
DEQUANT = ("dequant", 0, 0, 0, 0)  # not a kernel: dequantize to bf16 (int4: a Triton kernel) and F.linear


def candidates(op: str, M: int, K: int, group_size: int = 0, glu: bool = False) -> list[tuple]:
    """The configs _pick chooses from for op ("bf16", "int8", "int4") and M rows; the first is the default
    (used without timing under the interpreter, with FLINT_GEMV_TUNE=0, or in a CUDA graph capture). With glu
    each kernel that has the GLU epilogue comes twice: with it, and as "kernel+silu" (the plain kernel, then
    silu_mul's kernel), since the epilogue's pairing of gate and up rows costs some kernels more than the
    separate kernel (the bf16 fma configs on the H200), others less (int8_h2)."""
    configs = _candidates(op, M, K, group_size)
    if glu:  # bf16_cu's GLU epilogue pairs tiles: an even number of them
        configs = ([c for c in configs if not (c[0] == "bf16_cu" and c[1] % 2)]
                   + [(c[0] + "+silu",) + tuple(c[1:]) for c in configs if c[0] not in ("dot", "int4_dot", "dequant")])
    return configs


def _candidates(op: str, M: int, K: int, group_size: int) -> list[tuple]:
    if op == "int4":
        fma = _FMA_INT4 + _H2_INT4
        dot = _DOT_INT4
        mma = _MMA_INT4 if group_size in (32, 64, 128) else []
    else:
        fma = _FMA_BF16 if op == "bf16" else [c for c in _FMA_INT8 if c[0] not in ("int8_fma", "int8_h2") or K % 4 == 0]
        dot = _DOT
        mma = _MMA_INT8 if op == "int8" and K % 4 == 0 else _MMA_BF16 if op == "bf16" and K % 2 == 0 else []
    if os.environ.get("FLINT_GEMV_FP16", "1") == "0":  # no fp16 products (a model whose activations leave fp16's range)
        fma = [c for c in fma if not c[0].endswith("_h2")]
        mma = [c for c in mma if c[0] == "bf16_mma"]  # bf16 in, no fp16
    if os.environ.get("FLINT_GEMV_MMA", "1") == "0":
        mma = []
    if M == 1:
        configs = fma + dot[:1]
        if op == "int4" and _cuda_kernels_for(K, group_size):
            configs = configs + (_CU_INT4 if K % 1024 == 0 else _CU_INT4[-1:])
    elif M <= FMA_MAX_M:
        configs = fma[:3] + mma + dot
    elif M <= MMA_MAX_M:
        configs = dot + mma
    else:
        configs = dot if M <= 16 else [DEQUANT] + dot  # past 16 rows the old path first: the default, and timed
    # cuBLAS itself is a candidate at M > 1 (it wins some shapes), not at M = 1: there the fma kernels beat it
    # on every llama-3-8b shape inside a graph (H200, bench.py gemv: 0.81-1.05 of copy bandwidth against
    # 0.58-0.99), while do_bench's one-call timings put it within noise on qkv and o_proj and let it win now
    # and then (bf16 decode 240 against 252 tok/s when it took qkv and o_proj)
    if op == "bf16" and M > 1 and DEQUANT not in configs:
        configs = configs + [DEQUANT]
    if op == "bf16" and 1 < M <= MMA_MAX_M and _cuda_bf16_for(K):
        configs = configs + _CU_BF16
    return configs


def _cuda_bf16_for(K: int) -> bool:
    """Whether cuda_kernels' bf16 mma GEMV is a candidate (a GPU, nvcc, K a multiple of 32)."""
    if K % 32 or not torch.cuda.is_available() or _interpret():
        return False
    import cuda_kernels

    return cuda_kernels.available("cuda")


def _cuda_kernels_for(K: int, group_size: int) -> bool:
    """Whether cuda_kernels' int4 GEMV is a candidate (a GPU, nvcc, a group size it was built for)."""
    if not torch.cuda.is_available() or _interpret():
        return False
    import cuda_kernels

    return group_size in cuda_kernels.GROUP_SIZES and K % 32 == 0 and cuda_kernels.available("cuda")


_best: dict[tuple, tuple] = {}  # _key(...) -> config
_timings: dict[tuple, dict] = {}  # the same keys -> {config: ms} measured when it was picked


def row_bucket(M: int) -> int:
    return M if M <= FMA_MAX_M else MMA_MAX_M if M <= MMA_MAX_M else _block_m(M)


def _key(op: str, M: int, N: int, K: int, group_size: int, device: torch.device) -> tuple:
    """Tuning is per shape and row bucket (1, 2, 3, 4, 8 (the mma kernels' limit), then powers of two from 16
    up to 64): a chunked prefill of any length up to 64 rows reuses its bucket's choice instead of timing again."""
    index = torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index
    return op, row_bucket(M), N, K, group_size, index


def config_for(op: str, M: int, N: int, K: int, group_size: int = 0, device=None):
    """The config picked for this call shape so far (None if none was), e.g. for a benchmark's report."""
    return _best.get(_key(op, M, N, K, group_size, torch.device(device if device is not None else "cuda")))


def pick_name(key: tuple) -> str:
    """A tuning key as bench.py prints it in gemv_picks and FLINT_GEMV_PICKS takes it: "int4 M1 N4096 K4096 G128"."""
    op, M, N, K, group_size, _ = key
    return f"{op} M{M} N{N} K{K}" + (f" G{group_size}" if group_size else "")


def parse_config(name: str) -> tuple:
    """A config as pick lists write it ("int4_h2/64/8/2/1") -> ("int4_h2", 64, 8, 2, 1)."""
    return tuple(int(p) if p.isdigit() else p for p in name.split("/"))


@functools.cache
def _pinned_picks(text: str) -> dict[str, tuple]:
    """FLINT_GEMV_PICKS: a JSON object (or a file holding one) of picks as `bench.py decode --json` prints
    them in gemv_picks, e.g. {"bf16 M1 N4096 K4096": "fma/8/512/4/1"}: those shapes run that config
    untimed. The first-call timings differ by a percent or two between configs and their winner changes
    from process to process; an A/B run of other code should compare the same kernels."""
    import json

    if not text.lstrip().startswith("{") and os.path.isfile(text):
        with open(text) as f:
            text = f.read()

    try:
        picks = json.loads(text)
        return {name: parse_config(cfg) for name, cfg in picks.items()}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"FLINT_GEMV_PICKS: expected a JSON object (or a file holding one) of "
                         f"\"op M.. N.. K..\": \"kernel/n/n/n/n\" entries ({e})") from None


def _picks_file() -> Optional[str]:
    """Where picks persist between processes: FLINT_GEMV_CACHE (a file path; 0 turns it off), by default
    $XDG_CACHE_HOME/flint/gemv_picks.json (~/.cache/...)."""
    path = os.environ.get("FLINT_GEMV_CACHE")
    if path in ("0", ""):
        return None
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "flint", "gemv_picks.json")
    return path


@functools.cache
def _tuning_context(device_index: int) -> str:
    """What a persisted pick holds for: the GPU, torch, Triton, this file's kernels and cuda_kernels.py's (any
    edit retunes), PDL, and whether cuda_kernels' kernels are candidates (picks made without them, e.g. with
    FLINT_CUDA_KERNELS=0 or before nvcc was installed, would otherwise be kept once they are). That is
    cuda_kernels.buildable(), which does not wait for nvcc; a stored pick of a kernel that then fails to build is
    not among the candidates and is timed again (stored_pick)."""
    import hashlib

    import triton

    import cuda_kernels

    digest = hashlib.sha1()
    for path in (__file__, cuda_kernels.__file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    source = digest.hexdigest()[:12]
    major, minor = torch.cuda.get_device_capability(device_index)
    return (f"{torch.cuda.get_device_name(device_index)} sm_{major}{minor} | torch {torch.__version__} | "
            f"triton {triton.__version__} | gemv.py {source} | PDL {int(pdl_supported(device_index))} | "
            f"cuda_kernels {int(cuda_kernels.buildable(torch.device('cuda', device_index)))}")


def _read_picks(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            picks = json.load(f)
        return picks if isinstance(picks, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: tune
        return {}


def stored_pick(key: tuple, context: str, configs: list[tuple]) -> Optional[tuple]:
    """The config an earlier process picked for key in this context, if it is still one of configs."""
    path = _picks_file()
    if path is None:
        return None
    name = _read_picks(path).get(context, {}).get(pick_name(key))
    if not isinstance(name, str):
        return None
    cfg = parse_config(name)
    return cfg if cfg in configs else None


def store_pick(key: tuple, context: str, cfg: tuple) -> None:
    """Adds key's pick to the picks file (read again and replaced whole: processes tuning at once, such as
    tensor-parallel ranks, lose nothing but each other's last entries, which they then tune again)."""
    import json
    import tempfile

    path = _picks_file()
    if path is None:
        return
    picks = _read_picks(path)
    entries = picks.get(context) if isinstance(picks.get(context), dict) else {}
    entries[pick_name(key)] = "/".join(map(str, cfg))
    picks[context] = entries
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(picks, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: tune in every process
        warnings.warn(f"gemv: cannot store tuning picks in {path} ({e}); set FLINT_GEMV_CACHE to a writable file")
        os.environ["FLINT_GEMV_CACHE"] = "0"


TUNE_BYTES = 160 << 20  # weight copies timed together: over 3x the H200's 50 MB L2, so W comes from memory
TUNE_COPIES = 512  # at most: tiny weights (tests' shapes) would otherwise need ~10^4 copies, 2x that many launches a graph


@functools.cache
def _tuning_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device_index)


def time_in_graph(call, copies: int, calls: int) -> float:
    """ms per call of call(i) (i = 0..copies-1, e.g. one weight copy each, together past L2): calls launches
    back to back in one CUDA graph, as a decode step runs them (PDL overlap, launch gaps, split-K reduce
    kernels included; no host overhead); best of 3 replays. The first calls, on the capture stream,
    compile and warm cuBLAS and split-K's workspace there. (bench.py gemv times kernels the same way.)"""
    side = _tuning_stream(torch.cuda.current_device())  # one for all timings: split-K keeps a workspace per stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(copies):
            call(i)
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for i in range(calls):
            call(i % copies)
    graph.replay()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


_untimed = 0  # > 0 inside no_tuning()


@contextlib.contextmanager
def no_tuning():
    """Calls inside take their shape's pick so far, or else its default config untimed, and leave the shape
    untuned: for one-off calls such as a single prompt's prefill (6 tokens: the 8-row bucket, whose candidates
    took 41 of a cold int4 start's 78 s on the H200 for microseconds once), whose row count a decode batch may
    later want tuned."""
    global _untimed
    _untimed += 1
    try:
        yield
    finally:
        _untimed -= 1


def _pick(key: tuple, configs: list[tuple], launch, device: torch.device, weights: tuple = ()):
    """The config for key: on first sight on a GPU, the fastest of configs, unless FLINT_GEMV_PICKS names
    one. launch(config, *weights) runs the op; each config is timed in a CUDA graph over copies of weights
    (time_in_graph; FLINT_GEMV_TUNE=bench: triton's do_bench instead, one call at a time with L2 flushed, the
    way of earlier versions). Never times during CUDA graph capture (the default is used and kept) and
    never under the interpreter."""
    cfg = _best.get(key)
    if cfg is not None:
        return cfg
    pinned = _pinned_picks(os.environ["FLINT_GEMV_PICKS"]).get(pick_name(key)) if os.environ.get("FLINT_GEMV_PICKS") else None
    if pinned is not None:
        _best[key] = pinned
        return pinned
    if _untimed:
        return configs[0]
    cfg = configs[0]
    mode = os.environ.get("FLINT_GEMV_TUNE", "1")
    tune = device.type == "cuda" and not _interpret() and len(configs) > 1 and mode != "0"
    if tune and torch.cuda.is_current_stream_capturing():
        warnings.warn(f"gemv: first call for {key} inside CUDA graph capture: using the default config untimed "
                      f"(run the op once before capturing)")
        tune = False
    if tune:
        context = f"{_tuning_context(key[-1])} | {mode}"  # key ends with the device index
        stored = stored_pick(key, context, configs)
        if stored is not None:  # timed by an earlier process on this GPU with these kernels
            _best[key] = stored
            return stored
        from triton.testing import do_bench

        in_graph = mode != "bench"
        copies = [weights]
        if in_graph:
            nbytes = sum(t.numel() * t.element_size() for t in weights)
            try:
                copies += [tuple(t.clone() for t in weights)
                           for _ in range(min(-(-TUNE_BYTES // max(nbytes, 1)), TUNE_COPIES) - 1)]
            except torch.cuda.OutOfMemoryError:  # a full GPU (a KV pool sized to the brim): time the old way
                copies, in_graph = [weights], False
                torch.cuda.empty_cache()
                warnings.warn(f"gemv: no memory for weight copies to time {key} in a graph: do_bench instead")
        compile_candidates(configs, launch, weights)
        times = {}
        for c in configs:
            try:
                if in_graph:
                    times[c] = time_in_graph(lambda i: launch(c, *copies[i]), len(copies), max(2 * len(copies), 24))
                else:
                    launch(c, *weights)  # compiles
                    times[c] = do_bench(lambda: launch(c, *weights), warmup=5, rep=20, return_mode="median")
            except Exception as e:  # a config that does not compile or fit (shared memory) is skipped
                times[c] = float("inf")
                if type(e).__name__ != "OutOfResources":  # not fitting this GPU's shared memory is no news
                    warnings.warn(f"gemv: config {c} failed for {key}: {type(e).__name__}: {str(e)[:200]}")
        del copies
        # do_bench (one call at a time) cannot show that with PDL our kernels start under the previous
        # kernel's tail inside a decode graph, while cuBLAS (and tinygemm) launch plainly and pay a gap plus,
        # for split-K, a reduce kernel: there they must win by NO_PDL_HANDICAP (a judgment from two H200
        # profiles of the llama-3-8b step: 4.69 ms with cuBLAS split-K on o_proj and down_proj and no PDL,
        # 4.24 ms with fma kernels everywhere and PDL). Timed in a graph, the times say it themselves.
        handicap = NO_PDL_HANDICAP if _pdl_args(device).get("PDL") and not in_graph else 1.0
        cfg = min(times, key=lambda c: times[c] * (handicap if c[0] == "dequant" else 1.0))
        _timings[key] = times
        if times[cfg] < float("inf"):
            store_pick(key, context, cfg)
    _best[key] = cfg
    return cfg


def tuning_log() -> dict[tuple, tuple[tuple, dict]]:
    """What _pick settled on so far: {(op, M bucket, N, K, group_size, device index): (config, {config: ms})}."""
    return {key: (cfg, dict(_timings.get(key, {}))) for key, cfg in _best.items()}


# ---------------------------------------------------------------- launches (the ops' bodies)

@functools.cache
def pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch (Hopper and later, a Triton with gdc_wait): a kernel launched with it
    may start while the previous kernel of the stream is still running; ours read their first weight tile
    during that time and wait (gdc_wait) before reading x. A CUDA graph keeps it as a programmatic edge.
    FLINT_PDL=0 turns it off."""
    if _interpret() or os.environ.get("FLINT_PDL", "1") == "0" or not torch.cuda.is_available():
        return False
    import triton.language as tl

    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return (torch.cuda.get_device_capability(device_index)[0] >= 9
            and hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents"))


_PEEL_WITHOUT_PDL = False  # tests: the interpreter has no gdc_wait, but the peeled first step can run


def _pdl_args(device: torch.device) -> dict:
    """Launch arguments of the dense kernels: PEEL, PDL and launch_pdl where supported."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    if device.type == "cuda" and pdl_supported(index):
        return {"PEEL": True, "PDL": True, "launch_pdl": True}
    return {"PEEL": _PEEL_WITHOUT_PDL, "PDL": False}


_compiling = threading.local()  # .only: inside compile_candidates, this thread's launches compile and run nothing


def _launch(name: str, grid: tuple, *args, **kwargs) -> None:
    kernel = _kernels()[name]
    if getattr(_compiling, "only", False):
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def compile_candidates(configs: list[tuple], launch, weights: tuple) -> None:
    """Compiles the kernels of configs (launch(config, *weights) as _pick calls it) in threads, all at once,
    so that timing them one by one after finds them compiled: a cold start compiles some 100 kernels (int4 on
    llama-3-8b: 59 s one at a time on the H200's machine, 25 s in its 16 threads: ptxas and much of Triton's
    passes run outside the GIL). Launches in other threads run as usual. Without Triton's async compile mode
    (older Triton) it does nothing: each kernel compiles as it is first timed."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(configs), os.cpu_count() or 1, 16)
    if workers < 2 or os.environ.get("FLINT_GEMV_PARALLEL_COMPILE", "1") == "0":
        return
    _compiling.only = True
    try:
        # a config that fails to compile fails again when timed, which reports it
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for c in configs:
                try:
                    launch(c, *weights)
                except Exception:
                    pass
    finally:
        _compiling.only = False


def _grid_rows(kernel: str, M: int, N: int, block_n: int) -> tuple:
    """fma and h2 kernels: a program per (block of W rows, row of x), rows of x fastest; dot and mma kernels:
    per block (all rows of x at once)."""
    programs = -(-N // block_n)
    return (programs,) if "dot" in kernel or "mma" in kernel else (programs * M,)


def _block_m(M: int) -> int:
    """Rows of x a dot kernel computes at once: M padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (M - 1).bit_length())


def _unpack(cfg):
    """(kernel, BLOCK_N, BLOCK_K, warps, stages[, split[, ahead]]): split and ahead default to 1 and 0."""
    return tuple(cfg) + (1, 0)[len(cfg) - 5:] if len(cfg) < 7 else tuple(cfg)


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """y [..., 2F] = [gate, up] -> SiLU(gate) * up [..., F] in y's dtype, computed in fp32 and rounded once (as
    the kernels' GLU epilogue and inductor's fused kernel do); a Triton kernel on a GPU."""
    half = y.shape[-1] // 2
    if y.dim() == 2 and y.stride(1) == 1 and available(y):
        out = torch.empty(y.shape[0], half, dtype=y.dtype, device=y.device)
        pdl = _pdl_args(y.device)
        _launch("glu", (-(-half // 512), y.shape[0]), y, out, half, y.stride(0), out.stride(0), BLOCK=512,
                                                          PDL=pdl["PDL"], num_warps=2,
                                                          **({"launch_pdl": True} if pdl["PDL"] else {}))
        return out
    gate, up = y.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(y.dtype)


# kernels with the NORM prologue and the RES epilogue
FUSES_NORM_RES = ("fma", "fma_prmt", "int8_fma", "int8_h2", "int4_fma", "int4_h2", "int4_h2p", "int4_cu", "bf16_cu")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.RMSNorm's arithmetic (what the kernels' NORM prologue reproduces), for the paths without it."""
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def _check_residual(residual, M, N, glu):
    if residual is not None and (residual.shape != (M, N // 2 if glu else N) or residual.dtype != torch.bfloat16
                                 or not residual.is_contiguous()):
        raise ValueError(f"gemv: the residual must be a contiguous bf16 [{M}, {N // 2 if glu else N}] (the "
                         f"output's shape), got {residual.dtype} {list(residual.shape)}")


def rope_heads(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: int) -> torch.Tensor:
    """RoPE on the first `rows` columns of y [..., N] (heads of D = cos.shape[-1] columns, model.apply_rope's
    halves), cos and sin broadcasting against y [..., N / D, D]; in fp32, rounded once (as inductor's kernel)."""
    D = cos.shape[-1]
    heads = y.unflatten(-1, (-1, D))                                     # [..., N / D, D]
    q = heads[..., : rows // D, :].float()
    q1, q2 = q.chunk(2, dim=-1)
    rotated = (q * cos.float() + torch.cat((-q2, q1), dim=-1) * sin.float()).to(y.dtype)
    return torch.cat((rotated, heads[..., rows // D:, :]), dim=-2).flatten(-2)


def _unfused(run, x2, cfg, glu, norm, residual, rope=None):
    """A config whose kernel lacks the NORM prologue, the residual or the RoPE epilogue (dot, mma, cuBLAS,
    kernel+silu): the norm before it, the add or the rotation after it as plain ops (unfused, the linears'
    way). run(x2, cfg, glu) runs the kernel; rope = (cos, sin [M, D], rows) as the ops take it."""
    if rope is not None:
        cos, sin, rows = rope
        rope = (cos[:, None], sin[:, None], rows // cos.shape[1])  # the linears' (cos, sin, heads)
    return unfused(lambda x_, g: run(x_, cfg, g), x2, glu, norm, residual, rope)


def _rope_fits(cfg, rope, glu, residual) -> bool:
    """Whether a config's kernel can rotate its rows as it stores them: a program's BLOCK_N rows are halves of
    one head (row_block), so BLOCK_N must divide the head dim; not with GLU or a residual."""
    block_n = cfg[1]
    if cfg[0] == "int4_cu":  # any head dim: a warp's rows are pairs
        return not glu and residual is None and block_n >= 2
    if cfg[0] == "bf16_cu":  # pairs of tiles of 16 rows inside the halves of a head
        return not glu and residual is None and block_n % 2 == 0 and rope[0].shape[1] % 32 == 0
    return (not glu and residual is None and not cfg[0].endswith("+silu") and block_n >= 2
            and rope[0].shape[1] % block_n == 0)


def _ops_around_kernel(cfg, glu, norm, residual, rope) -> bool:
    """Whether config cfg's kernel lacks the norm prologue, residual or RoPE epilogue asked of it (_unfused)."""
    return ((norm is not None or residual is not None or rope is not None)
            and (cfg[0].removesuffix("+silu") not in FUSES_NORM_RES
                 or (rope is not None and not _rope_fits(cfg, rope, glu, residual))))


def _run_dense(x2, w, scales, cfg, glu=False, norm=None, residual=None, rope=None):
    """bf16 (scales None) or int8 through the fma, int8_fma, int8_h2, int8_mma, bf16_mma or dot kernel with
    config cfg -> y bf16 [M, N], or with glu (W = [gate; up]) SiLU(gate) * up [M, N / 2]: the fma, h2 and mma
    kernels in their epilogue, the others (dot, cuBLAS) through silu_mul after. norm = (weight bf16 [K], eps):
    RMSNorm(x2) instead of x2 (the fma and h2 kernels as they read x); residual [M, N']: added to the output;
    rope = (cos, sin [M, D] bf16, rows): RoPE on the output's first rows columns (heads of D)."""
    _check_residual(residual, x2.shape[0], w.shape[0], glu)
    if _ops_around_kernel(cfg, glu, norm, residual, rope):
        run = lambda x_, c, g: _run_dense(x_, w, scales, c, g)  # noqa: E731
        return _unfused(run, x2, cfg, glu, norm, residual, rope)
    if cfg[0].endswith("+silu"):  # the plain kernel (with the norm), then SwiGLU by its own kernel
        y = _run_dense(x2, w, scales, (cfg[0][:-5],) + tuple(cfg[1:]), False, norm)
        y = silu_mul(y) if glu else y
        return y if residual is None else residual + y
    kernel, block_n, block_k, warps, stages, split, ahead = _unpack(cfg)
    quant = scales is not None
    if kernel == "dequant":
        y = F.linear(x2, w.to(torch.bfloat16)) * scales.to(torch.bfloat16) if quant else F.linear(x2, w)
        return silu_mul(y) if glu else y
    if kernel == "dot" and glu:
        return silu_mul(_run_dense(x2, w, scales, cfg))
    if kernel == "bf16_cu" and not quant:
        return _run_bf16_cu(x2, w, cfg, glu, norm, residual, rope)
    M, K = x2.shape
    N = w.shape[0]
    if kernel == "int8_mma" and (M > 8 or K % 4 or w.data_ptr() % 4 or x2.stride(0) % 2 or x2.data_ptr() % 4):
        kernel = "int8_h2"  # B has 8 columns; W read as words, x as bf16 pairs
    if kernel == "bf16_mma" and (M > 8 or K % 2 or w.stride(0) % 2 or w.data_ptr() % 4 or x2.stride(0) % 2
                                 or x2.data_ptr() % 4):
        kernel, block_n, block_k, warps, stages, split, ahead = _unpack(_FMA_BF16[0])  # W, x read as words
    if kernel in ("int8_fma", "int8_h2") and (K % 4 or w.data_ptr() % 4):  # not readable as words: bytes
        kernel = "fma_prmt"
    if kernel == "int8_h2" and (x2.stride(0) % 2 or x2.data_ptr() % 4):  # x not readable as bf16 pairs
        kernel = "int8_fma"
    y = torch.empty(M, N // 2 if glu else N, dtype=torch.bfloat16, device=x2.device)
    grid = _grid_rows(kernel, M, N, block_n)
    part, count = _split_workspace(x2.device, split * M * N, grid[0]) if split > 1 else (y, y)
    common = dict(BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, SPLIT=split, num_warps=warps,
                  **_pdl_args(x2.device))
    if glu:
        common["GLU"] = True
    common.update(_prologue_epilogue(norm, residual, K, pairs=kernel == "int8_h2", rope=rope))
    s = scales if quant else w  # an unused pointer for bf16
    if kernel in ("int8_mma", "bf16_mma"):  # W and x as int32 words; a step of BLOCK_K columns = WPL words a lane
        words, xs = w.view(torch.int32), x2.view(torch.int32)  # times 16 (four int8 codes a word) or 8 (two bf16)
        common["WPL"] = block_k // (16 if quant else 8)
        del common["BLOCK_K"]
        _launch(kernel, (grid[0], split),
            xs, words, scales, y, part, count, M, N, K, xs.stride(0), words.stride(0), y.stride(0), AHEAD=ahead,
            ASM=not _interpret(), num_stages=1, **common)
    elif kernel in ("int8_fma", "int8_h2"):
        words = w.view(torch.int32)  # [N, K / 4]
        xs = x2.view(torch.int32) if kernel == "int8_h2" else x2  # h2 reads x as bf16 pairs [M, K / 2]
        _launch(kernel, (grid[0], split),
            xs, words, s, y, part, count, M, N, K, xs.stride(0), words.stride(0), y.stride(0), AHEAD=ahead,
            ASM=not _interpret(), num_stages=1, **common)  # the interpreter has no PTX: plain path
    elif kernel in ("fma", "fma_prmt"):
        _launch("fma", (grid[0], split),
            x2, w, s, y, part, count, M, N, K, x2.stride(0), w.stride(0), y.stride(0), QUANT=quant, STAGES=stages,
            num_stages=stages, AHEAD=ahead, PRMT=kernel == "fma_prmt" and not _interpret(), **common)
    else:
        _launch("dot", (grid[0], split),
            x2, w, s, y, part, count, M, N, K, x2.stride(0), w.stride(0), y.stride(0), QUANT=quant, STAGES=stages,
            num_stages=stages, BLOCK_M=_block_m(M), **common)
    return y


_split_buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (device, stream) -> (partials, counters)


def _split_workspace(device: torch.device, n_part: int, n_count: int):
    """fp32 partial sums and int32 counters for the kernels' K split: counters start at 0 and every call
    leaves them at 0, so one zeroed buffer per device and stream serves every call (kernels of a stream
    run one after another; with PDL a kernel touches them only after its gdc_wait)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    part, count = _split_buffers.get(key, (None, None))
    if part is None or part.numel() < n_part or count.numel() < n_count:
        part = torch.empty(max(n_part, 1 << 20), dtype=torch.float32, device=device)
        count = torch.zeros(max(n_count, 1 << 16), dtype=torch.int32, device=device)
        _split_buffers[key] = (part, count)
    return part, count


def _prologue_epilogue(norm, residual, K, pairs, rope=None):
    """The kernel arguments of the NORM prologue and RES epilogue (pairs: the kernel reads x, and so the norm's
    weight, as int32 words of two bf16)."""
    args = {}
    if norm is not None:
        g, eps = norm
        args.update(NORM=True, g_ptr=g.view(torch.int32) if pairs else g, eps=float(eps),
                    NORM_K=1 << (K - 1).bit_length(), NORM_ASM=not _interpret())
    if residual is not None:  # laid out as y (_check_residual)
        args.update(RES=True, r_ptr=residual)
    if rope is not None:
        cos, sin, rows = rope
        args.update(ROPE_D=cos.shape[1], cos_ptr=cos, sin_ptr=sin, rope_rows=rows)
    return args


def _run_int4(x2, packed, scales_zeros, group_size, cfg, glu=False, norm=None, residual=None, rope=None):
    """int4 through int4_fma_kernel / int4_h2_kernel / int4_mma_kernel / int4_dot_kernel with config cfg
    -> y bf16 [M, N], or SiLU(gate) * up [M, N / 2] with glu (norm, residual, rope as _run_dense)."""
    _check_residual(residual, x2.shape[0], packed.shape[0], glu)
    if _ops_around_kernel(cfg, glu, norm, residual, rope):
        run = lambda x_, c, g: _run_int4(x_, packed, scales_zeros, group_size, c, g)  # noqa: E731
        return _unfused(run, x2, cfg, glu, norm, residual, rope)
    if cfg[0].endswith("+silu"):  # the plain kernel (with the norm), then SwiGLU by its own kernel
        y = _run_int4(x2, packed, scales_zeros, group_size, (cfg[0][:-5],) + tuple(cfg[1:]), False, norm)
        y = silu_mul(y) if glu else y
        return y if residual is None else residual + y
    kernel, block_n, block_k, warps, stages = cfg
    if kernel == "dequant":
        y = F.linear(x2, int4_dequantize(packed, scales_zeros, group_size))
        return silu_mul(y) if glu else y
    if kernel == "int4_dot" and glu:
        return silu_mul(_run_int4(x2, packed, scales_zeros, group_size, cfg))
    if kernel == "int4_cu":
        return _run_int4_cu(x2, packed, scales_zeros, group_size, cfg, glu, norm, residual, rope)
    M, K = x2.shape
    N = packed.shape[0]
    y = torch.empty(M, N // 2 if glu else N, dtype=torch.bfloat16, device=x2.device)
    sz = scales_zeros.view(torch.int32).view(N, K // group_size)  # (scale, zero) bf16 pairs as one word
    if kernel == "int4_mma" and (M > 8 or group_size not in (32, 64, 128)):  # B has 8 columns
        kernel = "int4_h2"
    pipelined = kernel == "int4_h2p"  # int4_h2 with its loads pipelined by Triton: the fifth number is stages
    kernel = "int4_h2" if pipelined else kernel
    if kernel in ("int4_h2", "int4_mma") and (x2.stride(0) % 2 or x2.data_ptr() % 4):  # x not readable as bf16 pairs
        kernel = "int4_fma"
    if kernel in ("int4_fma", "int4_h2", "int4_mma"):
        words = packed.view(torch.int32)  # [N, K / 8]
        split = block_k
        grid = _grid_rows(kernel, M, N, block_n)
        part, count = _split_workspace(x2.device, split * M * N, grid[0])
        if kernel == "int4_fma":  # its OR constants arrive as runtime values (see the kernel)
            xs, extra, flags = x2, (0x43000000, 0x45000000), {}
        else:  # x as bf16 pairs [M, K / 2]; inline PTX unless interpreted
            xs, extra, flags = x2.view(torch.int32), (), {"ASM": not _interpret()}
            if kernel == "int4_mma":
                flags["ONE_ROW"] = M == 1
        if glu:
            flags["GLU"] = True
        flags.update(_prologue_epilogue(norm, residual, K, pairs=kernel != "int4_fma", rope=rope))
        if pipelined and kernel == "int4_h2":
            flags["STAGES"] = stages
        ahead, n_stages = (0, stages) if pipelined else (stages, 1)
        _launch(kernel, (grid[0], split),
            xs, words, sz, y, part, count, M, N, K, xs.stride(0), words.stride(0), sz.stride(0), y.stride(0),
            *extra, GROUP=group_size, BLOCK_N=block_n, SPLIT=split, AHEAD=ahead, num_warps=warps,
            num_stages=n_stages, **flags, **_pdl_args(x2.device))
    else:
        _launch("int4_dot", _grid_rows(kernel, M, N, block_n),
            x2, packed, sz, y, M, N, K, x2.stride(0), packed.stride(0), sz.stride(0), y.stride(0),
            GROUP=group_size, BLOCK_M=_block_m(M), BLOCK_N=block_n, STAGES=stages, num_warps=warps,
            num_stages=stages)
    return y


def _run_bf16_cu(x2, w, cfg, glu, norm, residual, rope):
    """bf16 through cuda_kernels.bf16_mma (config ("bf16_cu", tiles, unroll, warps, 1)); where it cannot run (more
    than 8 rows, x, W or the norm's weight not 16-byte aligned, an odd number of tiles for the GLU epilogue) the
    first fma config (with its fusions) or cuBLAS with the ops around it."""
    import cuda_kernels

    _, tiles, unroll, warps, _ = cfg
    M, K = x2.shape
    N = w.shape[0]
    rope_d = 0 if rope is None else rope[0].shape[1]
    if (not cuda_kernels.mma_supports(M, N, K, glu, rope_d) or x2.data_ptr() % 16 or x2.stride(0) % 8
            or w.data_ptr() % 16 or (norm is not None and norm[0].data_ptr() % 16)):
        return _run_dense(x2, w, None, _FMA_BF16[0] if M <= FMA_MAX_M else DEQUANT, glu, norm, residual, rope)
    if glu and tiles % 2:  # no GLU epilogue for one tile: the plain kernel, then silu_mul's (as "+silu" runs it)
        return _run_dense(x2, w, None, ("bf16_cu+silu",) + tuple(cfg[1:]), glu, norm, residual, rope)
    y = torch.empty(M, N // 2 if glu else N, dtype=torch.bfloat16, device=x2.device)
    if getattr(_compiling, "only", False):  # compile_candidates: the library was built by available()
        return y
    cuda_kernels.bf16_mma(x2, w, y, tiles, unroll, warps, bool(_pdl_args(x2.device).get("PDL")), norm=norm,
                          residual=residual, glu=glu, rope=rope)
    return y


def _run_int4_cu(x2, packed, scales_zeros, group_size, cfg, glu, norm, residual, rope):
    """int4 through cuda_kernels.int4_gemv (config ("int4_cu", rows, unroll, warps, 1)); where it cannot run
    (several rows of x, x or the norm's weight not 16-byte aligned, a shape it was not built for) the default
    int4_h2 config instead."""
    import cuda_kernels

    _, rows, unroll, warps, _ = cfg
    M, K = x2.shape
    N = packed.shape[0]
    if (M != 1 or x2.data_ptr() % 16 or (norm is not None and norm[0].data_ptr() % 16)
            or not cuda_kernels.supports(N, K, group_size, glu, rope is not None)
            or K % 1024 and (rows, unroll) != (2, 1)):
        return _run_int4(x2, packed, scales_zeros, group_size, _H2_INT4[0], glu, norm, residual, rope)
    y = torch.empty(M, N // 2 if glu else N, dtype=torch.bfloat16, device=x2.device)
    if getattr(_compiling, "only", False):  # compile_candidates: the library was built by available()
        return y
    words = packed.view(torch.int32)
    sz = scales_zeros.view(torch.int32).view(N, K // group_size)
    cuda_kernels.int4_gemv(x2, words, sz, y, group_size, rows, unroll, warps, bool(_pdl_args(x2.device).get("PDL")),
                           norm=norm, residual=residual, glu=glu, rope=rope)
    return y


def int4_dequantize(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """packed uint8 [N, K/2] + scales_zeros bf16 [N, K/G, 2] -> bf16 [N, K] (Triton where available)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    packed, scales_zeros = packed.contiguous(), scales_zeros.contiguous()
    if available(packed):
        w = torch.empty(N, K, dtype=torch.bfloat16, device=packed.device)
        grid = (-(-N // 32), -(-K // 256))
        _launch("int4_dequant", grid, packed, scales_zeros, w, N, K, GROUP=group_size, BLOCK_N=32, BLOCK_K=256)
        return w
    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(N, K).float()
    sz = scales_zeros.float()
    w = (q.reshape(N, -1, group_size) - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(N, K).to(torch.bfloat16)


def _check(x2, w, n_cols):
    if x2.dtype != torch.bfloat16 or x2.dim() != 2:
        raise ValueError(f"gemv: x must be bf16 [M, K], got {x2.dtype} {list(x2.shape)}")
    if x2.shape[1] != n_cols:
        raise ValueError(f"gemv: x has {x2.shape[1]} columns, the weight {n_cols}")
    if not w.is_contiguous():
        raise ValueError("gemv: the weight must be contiguous")


# ---------------------------------------------------------------- the custom ops

# glu=True (W = [gate; up], the fused gate/up projection): the ops return SiLU(gate) * up [M, N / 2] instead of
# y [M, N], applied as the kernel stores its sums (a decode step then runs no separate SwiGLU kernel).
# norm_weight (bf16 [K]) and eps: the op multiplies RMSNorm(x2) instead of x2 (model.RMSNorm's arithmetic), the
# fma and h2 kernels normalizing x as they read it; residual (bf16, laid out as the output): added to the output
# as they store it. With both, a decode step's block needs no kernels besides its linears and attention.
# Tuned apart from the plain call of the same shape (op names "bf16_glu", "bf16_norm", ...; the residual's add
# costs nothing to speak of and shares the plain tuning).

def _out_cols(N: int, glu: bool) -> int:
    if glu and N % 2:
        raise ValueError(f"gemv: glu needs an even number of weight rows ([gate; up]), got {N}")
    return N // 2 if glu else N


def _op_name(op: str, glu: bool, norm_weight, rope_cos=None) -> str:
    return (op + ("_norm" if norm_weight is not None else "") + ("_rope" if rope_cos is not None else "")
            + ("_glu" if glu else ""))


def _fused_args(x2, N, norm_weight, eps, residual, rope_cos=None, rope_sin=None, rope_rows=0):
    if norm_weight is not None and (norm_weight.shape != (x2.shape[1],) or norm_weight.dtype != x2.dtype):
        raise ValueError(f"gemv: the norm weight must be {x2.dtype} [{x2.shape[1]}], got "
                         f"{norm_weight.dtype} {list(norm_weight.shape)}")
    norm = None if norm_weight is None else (norm_weight.contiguous(), eps)
    rope = None
    if rope_cos is not None:
        D = rope_cos.shape[-1]
        if (rope_sin is None or rope_cos.shape != (x2.shape[0], D) or rope_sin.shape != rope_cos.shape or D % 2
                or N % D or rope_rows % D or not 0 <= rope_rows <= N or rope_cos.dtype != torch.bfloat16):
            raise ValueError(f"gemv: RoPE needs bf16 cos and sin [M, D] (D even, dividing N={N} and rope_rows="
                             f"{rope_rows}), got {None if rope_sin is None else list(rope_sin.shape)} "
                             f"{list(rope_cos.shape)} {rope_cos.dtype}")
        rope = (rope_cos.contiguous(), rope_sin.contiguous(), rope_rows)
    return norm, None if residual is None else residual.contiguous(), rope


@torch.library.custom_op("flint::bf16_linear", mutates_args=())
def bf16_linear(x2: torch.Tensor, w: torch.Tensor, glu: bool = False, norm_weight: Optional[torch.Tensor] = None,
                eps: float = 0.0, residual: Optional[torch.Tensor] = None, rope_cos: Optional[torch.Tensor] = None,
                rope_sin: Optional[torch.Tensor] = None, rope_rows: int = 0) -> torch.Tensor:
    """x2 bf16 [M, K] @ w bf16 [N, K]^T -> bf16 [M, N] (glu: SiLU(gate) * up [M, N / 2]; norm_weight: of
    RMSNorm(x2); residual: + residual; rope_cos, rope_sin [M, D]: RoPE on the first rope_rows outputs)."""
    _check(x2, w, w.shape[1])
    _out_cols(w.shape[0], glu)
    norm, residual, rope = _fused_args(x2, w.shape[0], norm_weight, eps, residual, rope_cos, rope_sin, rope_rows)
    M, K = x2.shape
    if M > MAX_M or M == 0 or not available(x2):
        return _run_dense(x2, w, None, DEQUANT, glu, norm, residual, rope)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    key = _key(_op_name("bf16", glu, norm_weight, rope_cos), M, w.shape[0], K, 0, x2.device)
    configs = candidates("bf16", M, K, 0, glu)
    if M > 1 and (norm is not None or rope is not None):  # the others would run them as eager ops in the op
        configs = [c for c in configs if not _ops_around_kernel(c, glu, norm, residual, rope)] or configs
    cfg = _pick(key, configs,
                lambda c, w_: _run_dense(x2, w_, None, c, glu, norm, residual, rope), x2.device, (w,))
    return _run_dense(x2, w, None, cfg, glu, norm, residual, rope)


@bf16_linear.register_fake
def _(x2, w, glu=False, norm_weight=None, eps=0.0, residual=None, rope_cos=None, rope_sin=None, rope_rows=0):
    return x2.new_empty(x2.shape[0], _out_cols(w.shape[0], glu))


@torch.library.custom_op("flint::int8_linear", mutates_args=())
def int8_linear(x2: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, glu: bool = False,
                norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
                residual: Optional[torch.Tensor] = None, rope_cos: Optional[torch.Tensor] = None,
                rope_sin: Optional[torch.Tensor] = None, rope_rows: int = 0) -> torch.Tensor:
    """x2 bf16 [M, K] @ (w int8 [N, K] * scales bf16 [N])^T -> bf16 [M, N] (glu, norm_weight, residual as
    bf16_linear)."""
    _check(x2, w, w.shape[1])
    _out_cols(w.shape[0], glu)
    norm, residual, rope = _fused_args(x2, w.shape[0], norm_weight, eps, residual, rope_cos, rope_sin, rope_rows)
    M, K = x2.shape
    if M > MAX_M or M == 0 or not available(x2):  # prefill: compute-bound, cuBLAS on a bf16 copy
        return _run_dense(x2, w, scales, DEQUANT, glu, norm, residual, rope)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    key = _key(_op_name("int8", glu, norm_weight, rope_cos), M, w.shape[0], K, 0, x2.device)
    cfg = _pick(key, candidates("int8", M, K, 0, glu),
                lambda c, w_, s_: _run_dense(x2, w_, s_, c, glu, norm, residual, rope), x2.device, (w, scales))
    return _run_dense(x2, w, scales, cfg, glu, norm, residual, rope)


@int8_linear.register_fake
def _(x2, w, scales, glu=False, norm_weight=None, eps=0.0, residual=None, rope_cos=None, rope_sin=None, rope_rows=0):
    return x2.new_empty(x2.shape[0], _out_cols(w.shape[0], glu))


@torch.library.custom_op("flint::int4_linear", mutates_args=())
def int4_linear(x2: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                glu: bool = False, norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
                residual: Optional[torch.Tensor] = None, rope_cos: Optional[torch.Tensor] = None,
                rope_sin: Optional[torch.Tensor] = None, rope_rows: int = 0) -> torch.Tensor:
    """x2 bf16 [M, K] @ W^T -> bf16 [M, N], W = (q - 8) * scale + zero per group of group_size columns;
    packed uint8 [N, K/2] (quantize.pack_nibbles), scales_zeros bf16 [N, K/G, 2] (glu, norm_weight, residual as
    bf16_linear)."""
    K = packed.shape[1] * 2
    _check(x2, packed, K)
    _out_cols(packed.shape[0], glu)
    if group_size % 32 or K % group_size or scales_zeros.shape != (packed.shape[0], K // group_size, 2):
        raise ValueError(f"gemv: int4 needs a group size that is a multiple of 32 dividing K={K} and "
                         f"scales_zeros [N, K/G, 2]; got G={group_size}, {list(scales_zeros.shape)}")
    norm, residual, rope = _fused_args(x2, packed.shape[0], norm_weight, eps, residual, rope_cos, rope_sin,
                                       rope_rows)
    M = x2.shape[0]
    if M > MAX_M or M == 0 or not available(x2):
        return _run_int4(x2, packed, scales_zeros, group_size, DEQUANT, glu, norm, residual, rope)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    scales_zeros = scales_zeros.contiguous()
    key = _key(_op_name("int4", glu, norm_weight, rope_cos), M, packed.shape[0], K, group_size, x2.device)
    cfg = _pick(key, candidates("int4", M, K, group_size, glu),
                lambda c, p_, sz_: _run_int4(x2, p_, sz_, group_size, c, glu, norm, residual, rope), x2.device,
                (packed, scales_zeros))
    return _run_int4(x2, packed, scales_zeros, group_size, cfg, glu, norm, residual, rope)


@int4_linear.register_fake
def _(x2, packed, scales_zeros, group_size, glu=False, norm_weight=None, eps=0.0, residual=None, rope_cos=None,
      rope_sin=None, rope_rows=0):
    return x2.new_empty(x2.shape[0], _out_cols(packed.shape[0], glu))


# ---------------------------------------------------------------- float linears of a model

# The bf16 fma kernels normalize each x element they read for several rows of W at a time (the h2 kernels of
# int8 and int4 a bf16 pair in 6 instructions): on the H200 at K = 4096 (llama-3-8b) that cost more than the
# separate norm kernel it saves (251.5 tok/s with only the residual add in the kernels, 244.3-246.2 with the
# norm too, 248.9 with neither); at K = 576 (SmolLM2-135M) both together gave 1921 against 1805 tok/s (the
# norm's share not measured apart). So a bf16 Linear takes the norm into its kernel up to this many input
# features; int8 and int4 always (434.3 against 423.2 tok/s at K = 4096).
BF16_NORM_MAX_K = 1024


def fusable(x: torch.Tensor, norm, bias, rows: bool = False) -> bool:
    """Whether a linear's kernel takes the RMSNorm (norm = (weight, eps)) and the residual add of model.linear:
    one row of bf16 x (a batch-1 decode step: every candidate kernel at one row has them; at more rows the
    mma, dot and cuBLAS candidates would need them as separate ops, which inductor fuses better outside the
    op), or up to MMA_MAX_M rows where rows says the layer's kernels take them there (bf16_cu: Linear.fuses_rows),
    no bias (it comes before the residual), unless FLINT_GEMV_FUSE=0."""
    return ((x.numel() == x.shape[-1] or rows and x.numel() <= MMA_MAX_M * x.shape[-1])
            and x.dtype == torch.bfloat16 and bias is None
            and (norm is None or norm[0].dtype == torch.bfloat16) and os.environ.get("FLINT_GEMV_FUSE", "1") != "0")


def rows_fusions() -> str:
    """What bf16 linears take into their kernel at 2..8 rows (Linear.fuses_rows), FLINT_GEMV_FUSE_ROWS:
    "residual" (the default: the residual add, at the row buckets where the tuner picked a kernel that has it,
    cuda_kernels' bf16 mma kernel: elsewhere the add stays outside the op, where inductor fuses it into the next
    norm's kernel; on the H200 llama-3-8b bf16 batch 8 and batch 4 +1.1%), "all" (the norm and RoPE too,
    wherever the bf16 mma kernel runs: the op then times only kernels that have them, since the others would
    run them as eager ops; at batch 8 that lost 2-3%: bf16_cu is slower than cuBLAS on qkv and gate_up), "0"
    (none; also FLINT_GEMV_FUSE=0)."""
    if os.environ.get("FLINT_GEMV_FUSE", "1") == "0":
        return "0"
    return os.environ.get("FLINT_GEMV_FUSE_ROWS", "residual")


def rope_enabled() -> bool:
    """RoPE in the q/k/v matmul's epilogue (on by default, measured on the H200: int8 +2.1%, bf16 +0.6%;
    FLINT_GEMV_ROPE=0 turns it off): else the linears rotate after their kernel, as a plain op that inductor
    fuses into one kernel."""
    return os.environ.get("FLINT_GEMV_ROPE", "1") == "1"


def rope_after(forward, x, glu, norm, residual, rope):
    """forward(x, glu, norm) (the norm still in the kernel where it can), then RoPE and the residual add as plain
    ops."""
    return unfused(lambda x_, g: forward(x_, g, norm), x, glu, None, residual, rope)


def ops_outside_kernel(layer, x, glu, norm, residual, rope, kernel: bool, rows: bool = False):
    """A linear's forward(x, glu, norm, residual, rope) where its kernel cannot take the norm, residual add or
    RoPE asked of it (kernel: the layer runs gemv's kernels at all; rows: at up to MMA_MAX_M rows too): the
    output with those as plain ops around layer.forward; None when the kernel takes them (or none were asked)."""
    if norm is None and residual is None and rope is None:
        return None
    if rope is not None and (residual is not None or not rope_enabled()):
        return rope_after(layer.forward, x, glu, norm, residual, rope)
    if not (kernel and fusable(x, norm, layer.bias, rows) and (layer.fuses_glu or not glu)):
        return unfused(layer.forward, x, glu, norm, residual, rope)
    return None


def unfused(forward, x, glu, norm, residual, rope=None):
    """forward(x, glu) with model.linear's RMSNorm before it, RoPE (rope = (cos, sin, heads)) and residual add
    after it as plain ops."""
    y = forward(x if norm is None else rms_norm(x, *norm), glu)
    if rope is not None:
        cos, sin, heads = rope
        y = rope_heads(y, cos, sin, heads * cos.shape[-1])
    return y if residual is None else residual + y


class Linear(torch.nn.Linear):
    """nn.Linear whose few-row calls (decode) go through bf16_linear: the same parameters, so it keeps
    ties and state-dict names. Anything else (prefill, other dtypes) is F.linear. forward(x, glu=True)
    returns SiLU(gate) * up of a [gate; up] weight; norm = (weight, eps) multiplies RMSNorm(x) instead of x,
    residual is added to the output (model.linear passes them to linears that set fuses_ops), inside the
    kernel where fusable() says so: at one row, and at the row buckets of 2..8 in fuses_rows (tune_linears puts
    a bucket there where the tuner picked a kernel with the residual add, cuda_kernels' bf16 mma kernel; see
    rows_fusions())."""
    fuses_ops = True
    fuses_rows = frozenset()

    @property
    def fuses_glu(self) -> bool:
        return glu_enabled()

    def forward(self, x, glu: bool = False, norm=None, residual=None, rope=None):
        rows = x.numel() // x.shape[-1]
        many = (1 < rows <= MMA_MAX_M and row_bucket(rows) in self.fuses_rows
                and (norm is None and rope is None or rows_fusions() == "all"))
        out = ops_outside_kernel(self, x, glu, norm, residual, rope, self.weight.dtype == torch.bfloat16, many)
        if out is not None:
            return out
        if glu and not self.fuses_glu:  # FLINT_GEMV_GLU=0
            return silu_mul(self.forward(x))
        if norm is not None and self.in_features > BF16_NORM_MAX_K and not many:  # the norm as its own kernel
            x, norm = rms_norm(x, *norm), None
        if (rows > MAX_M or x.dtype != torch.bfloat16 or self.weight.dtype != torch.bfloat16
                or (glu and self.bias is not None)):  # a bias must come before the GLU: not in the epilogue
            y = F.linear(x, self.weight, self.bias)
            return silu_mul(y.reshape(rows, -1)).reshape(*x.shape[:-1], -1) if glu else y
        y = torch.ops.flint.bf16_linear(x.reshape(rows, x.shape[-1]), self.weight, glu,
                                        *fused_op_args(norm, residual, rope))
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y + self.bias if self.bias is not None else y


def fused_op_args(norm, residual, rope=None) -> tuple:
    """The ops' norm_weight, eps, residual, rope_cos, rope_sin, rope_rows arguments from a linear's norm =
    (weight, eps), residual and rope = (cos, sin [..., 1, D], heads)."""
    weight, eps = norm if norm is not None else (None, 0.0)
    cos, sin, rows = None, None, 0
    if rope is not None:
        cos, sin, heads = rope
        D = cos.shape[-1]
        cos, sin, rows = cos.reshape(-1, D), sin.reshape(-1, D), heads * D
    return weight, float(eps), None if residual is None else residual.reshape(-1, residual.shape[-1]), cos, sin, rows


def use_for_linears(model: torch.nn.Module) -> int:
    """Switch every bf16 nn.Linear of model on a device gemv runs on to Linear (in place: the module's
    class changes, its tensors stay), unless FLINT_GEMV=0. -> how many were switched."""
    n = 0
    if not enabled():
        return n
    for m in model.modules():
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 and available(m.weight):
            m.__class__ = Linear
            n += 1
    return n


def tune_linears(model: torch.nn.Module, dtype: torch.dtype, device, row_counts=None) -> None:
    """Run one linear of each shape (anything with in_features/out_features: Linear, the quantized ones)
    at every row bucket (or those of row_counts), so each kernel picks its config now rather than on a
    request's first call of that shape (a server's first short prompt would otherwise wait for the timing)."""
    buckets = sorted({row_bucket(m) for m in (row_counts or range(1, MAX_M + 1)) if m <= MAX_M})
    seen = set()
    for name, m in model.named_modules():
        if not (hasattr(m, "in_features") and hasattr(m, "out_features")):
            continue
        # the gate/up projection runs with the GLU epilogue where the linear has one (model.FeedForward)
        glu = name.endswith("gate_up_proj") and getattr(m, "fuses_glu", False)
        # model.Block's norms go into qkv_proj and gate_up_proj at one row (fusable: tuned as "..._norm")
        norm = (name.endswith("qkv_proj") or name.endswith("gate_up_proj")) and getattr(m, "fuses_ops", False)
        shape = (type(m), m.in_features, m.out_features, getattr(m, "group_size", None), glu, norm)
        if shape in seen:  # tuning is keyed by shape: the other layers would only repeat it
            continue
        seen.add(shape)
        for rows in buckets:
            x = torch.zeros(rows, m.in_features, dtype=dtype, device=device)
            m(x, glu=True) if glu else m(x)
            if norm and (rows == 1 or 1 < rows <= MMA_MAX_M and rows_fusions() == "all" and isinstance(m, Linear)
                         and _cuda_bf16_for(m.in_features)):
                kw = {"glu": True} if glu else {}
                parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                if name.endswith("qkv_proj") and rope_enabled() and hasattr(parent, "head_dim"):  # model.Attention
                    cos = torch.ones(rows, 1, 1, parent.head_dim, dtype=dtype, device=device)
                    kw["rope"] = (cos, torch.zeros_like(cos), parent.n_heads + parent.n_kv_heads)
                m(x, norm=(torch.ones(m.in_features, dtype=dtype, device=device), 1e-5), **kw)
    set_rows_fusions(model, buckets, torch.device(device))


def set_rows_fusions(model: torch.nn.Module, buckets, device: torch.device) -> None:
    """Linear.fuses_rows of every bf16 Linear of model from the picks of the row buckets of 2..8 in buckets (see
    rows_fusions()): the residual add goes into the op where the picked kernel has it (a kernel without it
    would add it as an eager op, where outside the op inductor fuses it into the next norm's kernel)."""
    policy = rows_fusions()
    for m in model.modules():
        if not isinstance(m, Linear):
            continue
        rows = set(m.fuses_rows)
        for b in buckets:
            if not 1 < b <= MMA_MAX_M:
                continue
            if policy == "all":
                fuses = _cuda_bf16_for(m.in_features)
            else:
                cfg = config_for("bf16", b, m.out_features, m.in_features, 0, device)
                fuses = policy != "0" and cfg is not None and cfg[0] in FUSES_NORM_RES
            (rows.add if fuses else rows.discard)(b)
        m.fuses_rows = frozenset(rows)
