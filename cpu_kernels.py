"""C++ kernels for CPU decode on x86 with AVX2: int4 and int8 weight-only matmuls, and one decode step's attention
over a static cache. Registered as torch ops (torch.ops.flint.cpu_*), so compiled graphs call them directly.

    torch.ops.flint.cpu_q4_linear(x, packed, scales_zeros, group_size, norm_weight, eps, residual, glu)
    torch.ops.flint.cpu_q8_linear(x, weight, scales, norm_weight, eps, residual, glu)
        x fp32 [M, K] -> fp32 [M, N]: residual + SwiGLU(RMSNorm(x) @ W^T) (the last four optional: model.linear's
        ops, fused_linear() passes them)
    torch.ops.flint.cpu_decode_attention(q, k, v, k_cache, v_cache, pos, window)   (kv.decode_attention's contract)
    pack_q4(q), pack_scales(scales, zeros)      quantize.py's codes -> the int4 layout; round_activations(x)

Why: ATen's `_weight_int4pack_mm_for_cpu` dequantizes every weight to float and multiplies in fp32; on a 2-core
AVX2 machine that is compute-bound (~5 GB/s over SmolLM2-135M's int4 layers). Here the activations are rounded to
int8 per block of 32 (scale amax / 127, as llama.cpp does) and multiplied with the weight codes as 8-bit integers
(vpmaddubsw: 32 multiply-adds an instruction instead of 8). The int4 layout puts 8 weight rows side by side, so
one vpmaddubsw serves 8 output rows and the result comes out as one vector (no horizontal sums), and each thread
reads one contiguous stream (prefetched ahead). They are C++ ops: a Python implementation cost ~20 us a call,
and a decode step makes ~150 calls. SDPA over a static cache attends over every slot with a mask (~150 us a layer at
385 slots); decode_attention reads slots up to each row's position only.

Numerics: the matmuls compute exactly W @ x_rounded (x rounded to int8 per block of 32, fp32 accumulation): about
3x the error of rounding x to bf16 (what ATen's CPU kernels use), the same as llama.cpp's Q8 activations. The int4
zero term takes the group sum of the rounded x, so rounding errors meet the centred weights, not the codes.

Layouts. int4: codes [N, K] -> uint8 [N/8, K/32, 128]; per 8 rows and block of 32 columns, 4 x 32 bytes, byte
4r + i of the j-th holding row r's code 4j + i (low nibble) and 16 + 4j + i (high nibble); scales_zeros bf16
[N/8, K/G, 2, 8] (8 rows' scales, then their zeros), w = (q - 8) * scale + zero. int8: weight [N, K], scales
bf16 [N], w = q * scale (quantize.Int8Linear's own layout). N % 8 == 0, K % 32 == 0, G % 32 == 0.

The source below is compiled once (g++ and torch's headers, ~20 s; torch.compile's CPU backend needs the same
compiler) into ~/.cache/flint and loaded with torch.ops.load_library. Where it cannot be built or the CPU lacks
AVX2/FMA, available() is False (build_error() says why) and quantize.py and kv.py keep ATen's kernels and SDPA.
FLINT_CPU_KERNELS=0 turns it off.
"""
import hashlib
import os
import subprocess
import sys
import tempfile

import torch

import gemv

CPP_SOURCE = r"""#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x fp32 [K] -> xq int8 [K], xd [K/32] (per block: x ~= xd * xq), and if G: xs [K/G] (group sums of xd * xq) */
static void quantize_row(const float *x, int64_t K, int64_t G, int8_t *xq, float *xd, float *xs) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < K / 32; b++) {
        const float *p = x + 32 * b;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(p + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], abs_mask));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        float d = _mm_cvtss_f32(m) / 127.0f;
        xd[b] = d;
        __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m256i i[4];
        for (int j = 0; j < 4; j++)
            i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* packs work within 128-bit lanes: the permute puts the 32 bytes back in order */
        __m256i i16a = _mm256_packs_epi32(i[0], i[1]), i16b = _mm256_packs_epi32(i[2], i[3]);
        __m256i i8 = _mm256_packs_epi16(i16a, i16b);
        i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + 32 * b), i8);
    }
    /* the zero term takes the group sum of the rounded x, so that the result is exactly W @ x_rounded: the
       rounding errors then meet the (centred) weights, not the codes 0..15 */
    for (int64_t g = 0; G && g < K / G; g++) {
        float s = 0.0f;
        for (int64_t b = g * (G / 32); b < (g + 1) * (G / 32); b++) {
            int sum = 0;
            for (int k = 0; k < 32; k++) sum += xq[32 * b + k];
            s += xd[b] * (float)sum;
        }
        xs[g] = s;
    }
}

static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t G, int8_t *xq, float *xd, float *xs) {
    #pragma omp parallel for if (M > 8)
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, G, xq + m * K, xd + m * (K / 32), G ? xs + m * (K / G) : nullptr);
}

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m256i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* int4, 8 weight rows (tile t) x MR activation rows (from m): a 32-byte load holds codes of all 8 rows for 4
   input columns (low nibbles) and 4 more (high nibbles), so vpmaddubsw against 4 activation bytes broadcast to
   every lane sums 2 products per int16 lane, 2 lanes per row; 8 such steps per block still fit int16
   (8 * 2 * 15 * 127 = 30480), one vpmaddwd turns them into 8 int32 row sums: y's 8 rows come out as one vector,
   no horizontal sums. */
static inline __attribute__((always_inline)) void q4_tile(
        const int MR, int64_t t, int64_t m, int64_t N, int64_t K, int64_t G,
        const uint8_t *w, const uint16_t *sz, const int8_t *xq, const float *xd, const float *xs, float *y) {
    const int64_t nb = K / 32, ng = K / G, bpg = G / 32;
    const uint8_t *wt = w + t * nb * 128;
    const uint16_t *st = sz + t * ng * 16;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int c = 0; c < MR; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256 s = bf16x8(st + 16 * g), zero = bf16x8(st + 16 * g + 8);
        __m256 low = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, zero);  /* w = s * q + low */
        for (int c = 0; c < MR; c++) acc[c] = _mm256_fmadd_ps(low, _mm256_set1_ps(xs[(m + c) * ng + g]), acc[c]);
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            _mm_prefetch((const char *)(wt + 128 * b + 1024), _MM_HINT_T0);  /* 8 blocks ahead */
            _mm_prefetch((const char *)(wt + 128 * b + 1024 + 64), _MM_HINT_T0);
            __m256i sum16[4];
            for (int c = 0; c < MR; c++) sum16[c] = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wt + 128 * b + 32 * j));
                __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                for (int c = 0; c < MR; c++) {
                    const int8_t *xb = xq + (m + c) * K + 32 * b;
                    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(xb + 4 * j)),
                                                 _mm256_maddubs_epi16(hi, broadcast4(xb + 16 + 4 * j)));
                    sum16[c] = _mm256_add_epi16(sum16[c], p);
                }
            }
            for (int c = 0; c < MR; c++) {
                __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16[c], ones));
                acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(xd[(m + c) * nb + b])), p, acc[c]);
            }
        }
    }
    for (int c = 0; c < MR; c++) _mm256_storeu_ps(y + (m + c) * N + 8 * t, acc[c]);
}

static void q4_tiles(int64_t t0, int64_t t1, int64_t M, int64_t N, int64_t K, int64_t G, const uint8_t *w,
                     const uint16_t *sz, const int8_t *xq, const float *xd, const float *xs, float *y) {
    for (int64_t t = t0; t < t1; t++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) q4_tile(4, t, m, N, K, G, w, sz, xq, xd, xs, y);
        if (M - m == 3) q4_tile(3, t, m, N, K, G, w, sz, xq, xd, xs, y);
        if (M - m == 2) q4_tile(2, t, m, N, K, G, w, sz, xq, xd, xs, y);
        if (M - m == 1) q4_tile(1, t, m, N, K, G, w, sz, xq, xd, xs, y);
    }
}

/* int8 [N, K] rows: NR rows `stride` apart (NR sequential streams: adjacent rows read in turn confuse the
   hardware prefetcher: 6.5 against 12 GB/s for a 28 MB head) x MR activation rows */
static inline __attribute__((always_inline)) void q8_tile(
        const int NR, const int MR, int64_t n, int64_t stride, int64_t m, int64_t N, int64_t K,
        const int8_t *w, const uint16_t *scales, const int8_t *xq, const float *xd, float *y) {
    const int64_t nb = K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][2];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < MR; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv[4], wabs[4];
        for (int r = 0; r < NR; r++) {
            wv[r] = _mm256_loadu_si256((const __m256i *)(w + (n + r * stride) * K + 32 * b));
            wabs[r] = _mm256_sign_epi8(wv[r], wv[r]);  /* |w| as the unsigned operand; w's sign moves onto x */
        }
        for (int c = 0; c < MR; c++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (m + c) * K + 32 * b));
            __m256 d = _mm256_set1_ps(xd[(m + c) * nb + b]);
            for (int r = 0; r < NR; r++) {
                __m256i p16 = _mm256_maddubs_epi16(wabs[r], _mm256_sign_epi8(xv, wv[r]));  /* <= 2 * 127^2 */
                acc[r][c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < NR; r++) {
        float s = bf16_to_float(scales[n + r * stride]);
        for (int c = 0; c < MR; c++) y[(m + c) * N + n + r * stride] = s * hsum(acc[r][c]);
    }
}

static void q8_rows(int64_t n0, int64_t n1, int64_t M, int64_t N, int64_t K, const int8_t *w,
                    const uint16_t *scales, const int8_t *xq, const float *xd, float *y) {
    int64_t stride = (n1 - n0) / 4;
    for (int64_t m = 0; m < M; m += 2) {
        int two = M - m >= 2;
        for (int64_t n = n0; n < n0 + stride; n++) {
            if (two) q8_tile(4, 2, n, stride, m, N, K, w, scales, xq, xd, y);
            else q8_tile(4, 1, n, stride, m, N, K, w, scales, xq, xd, y);
        }
        for (int64_t n = n0 + 4 * stride; n < n1; n++) {
            if (two) q8_tile(1, 2, n, 0, m, N, K, w, scales, xq, xd, y);
            else q8_tile(1, 1, n, 0, m, N, K, w, scales, xq, xd, y);
        }
    }
}

/* each thread takes one contiguous part of the weight rows ([start, end) of `count` units) */
#define THREAD_PART(count, start, end)                                                          \
    int64_t nt_ = omp_get_num_threads(), t_ = omp_get_thread_num();                             \
    int64_t start = (count) * t_ / nt_, end = (count) * (t_ + 1) / nt_;


/* e^x (x clamped to [-87, 88]; the softmax after subtracting the max, SiLU): e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln(2) / 2,
   e^r by a degree-7 polynomial (Cephes' expf coefficients; ~1 ulp) */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln 2 in two parts: n * hi is exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* One decode step's attention for one (row, head), fp32: softmax(q k^T / sqrt(D)) v over the n slots of kb and
   vb (slot stride ss, unit along D) -> o [D]. D % 8 == 0. */
template <int VECS>  /* D / 8 when D <= 64 (the whole output row in registers), else 0: loop over D in 64s */
static void attend_one(const float *qh, const float *kb, const float *vb, int64_t ss, int64_t n, int64_t D,
                       float *scores, float *o) {
    const float scale = 1.0f / std::sqrt((float)D);
    float max = -INFINITY;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {  /* 4 slots at a time: 4 independent FMA chains */
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t d = 0; d < D; d += 8) {
            __m256 qd = _mm256_loadu_ps(qh + d);
            for (int j = 0; j < 4; j++) acc[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kb + (i + j) * ss + d), acc[j]);
        }
        for (int j = 0; j < 4; j++) {
            scores[i + j] = hsum(acc[j]) * scale;
            max = scores[i + j] > max ? scores[i + j] : max;
        }
    }
    for (; i < n; i++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kb + i * ss + d), acc);
        scores[i] = hsum(acc) * scale;
        max = scores[i] > max ? scores[i] : max;
    }
    const int64_t n8 = (n + 7) / 8 * 8;
    __m256 sum8 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n8; i += 8) {  /* the tail past n is masked to 0 */
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + i), _mm256_set1_ps(max)));
        __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)i), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx)));
        _mm256_storeu_ps(scores + i, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum(sum8));
    for (int64_t d0 = 0; d0 < D; d0 += 64) {  /* up to 8 accumulators of 8 along D, through all slots */
        const int vecs = VECS ? VECS : (D - d0 < 64 ? (int)(D - d0) / 8 : 8);
        __m256 acc[8];
        for (int j = 0; j < vecs; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i++) {
            __m256 w = _mm256_set1_ps(scores[i]);
            for (int j = 0; j < vecs; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vb + i * ss + d0 + 8 * j), acc[j]);
        }
        for (int j = 0; j < vecs; j++) _mm256_storeu_ps(o + d0 + 8 * j, _mm256_mul_ps(acc[j], inv));
    }
}

// ---------------------------------------------------------------- the ops (checks, then the kernels)

/* model.linear's ops around a matmul: x [M, K] -> RMSNorm(x) * norm_weight (model.RMSNorm's arithmetic) before
   it; after it y [M, N] -> SiLU(gate) * up of y = [gate, up] if glu, + residual. */
struct Around {
    at::Tensor x, norm_weight, residual;
    double eps;
    bool glu;
};

static Around around(const char *op, const at::Tensor &x, int64_t K, int64_t N,
                     const std::optional<at::Tensor> &norm_weight, double eps,
                     const std::optional<at::Tensor> &residual, bool glu) {
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                      op, ": x must be fp32 [M, ", K, "] on the CPU, got ", x.scalar_type(), " ", x.sizes(), " on ",
                      x.device());
    Around a{x.contiguous(), at::Tensor(), at::Tensor(), eps, glu};
    if (norm_weight.has_value()) {
        TORCH_CHECK_VALUE(norm_weight->dim() == 1 && norm_weight->size(0) == K && norm_weight->scalar_type() == at::kFloat,
                          op, ": the norm weight must be fp32 [", K, "], got ", norm_weight->scalar_type(), " ",
                          norm_weight->sizes());
        a.norm_weight = norm_weight->contiguous();
    }
    TORCH_CHECK_VALUE(!glu || N % 2 == 0, op, ": glu needs an even number of weight rows ([gate; up]), got ", N);
    if (residual.has_value()) {
        const int64_t cols = glu ? N / 2 : N;
        TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({x.size(0), cols}) &&
                              residual->scalar_type() == at::kFloat,
                          op, ": the residual must be fp32 [", x.size(0), ", ", cols, "] (the output's shape), got ",
                          residual->scalar_type(), " ", residual->sizes());
        a.residual = residual->contiguous();
    }
    return a;
}

/* the rows the matmul reads: x, or RMSNorm(x) * weight in `buffer` */
static const float *normed(const Around &a, std::vector<float> &buffer) {
    const int64_t M = a.x.size(0), K = a.x.size(1);
    const float *x = a.x.data_ptr<float>();
    if (!a.norm_weight.defined()) return x;
    buffer.resize(M * K);
    const float *w = a.norm_weight.data_ptr<float>();
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        __m256 ss = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) ss = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(xr + k), ss);
        float sum = hsum(ss);
        for (; k < K; k++) sum += xr[k] * xr[k];
        const float r = 1.0f / std::sqrt(sum / (float)K + (float)a.eps);
        for (k = 0; k < K; k++) buffer[m * K + k] = w[k] * (xr[k] * r);
    }
    return buffer.data();
}

/* y [M, N] -> the op's output: SiLU(gate) * up if glu, + residual */
static at::Tensor finish(const Around &a, at::Tensor y) {
    const int64_t M = y.size(0), N = y.size(1), cols = a.glu ? N / 2 : N;
    if (!a.glu && !a.residual.defined()) return y;
    at::Tensor out = a.glu ? at::empty({M, cols}, y.options()) : y;
    const float *yp = y.data_ptr<float>(), *res = a.residual.defined() ? a.residual.data_ptr<float>() : nullptr;
    float *op = out.data_ptr<float>();
    for (int64_t m = 0; m < M; m++) {
        int64_t j = 0;
        if (a.glu) {
            for (; j + 8 <= cols; j += 8) {  /* SiLU(g) * u = g * u / (1 + e^-g) */
                __m256 g = _mm256_loadu_ps(yp + m * N + j), u = _mm256_loadu_ps(yp + m * N + cols + j);
                __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g)));
                _mm256_storeu_ps(op + m * cols + j, _mm256_div_ps(_mm256_mul_ps(g, u), den));
            }
            for (; j < cols; j++) {
                float g = yp[m * N + j];
                op[m * cols + j] = g * yp[m * N + cols + j] / (1.0f + std::exp(-g));
            }
        }
        if (res)
            for (j = 0; j < cols; j++) op[m * cols + j] += res[m * cols + j];
    }
    return out;
}

static at::Tensor cpu_q4_linear(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales_zeros,
                                int64_t group_size, const std::optional<at::Tensor> &norm_weight, double eps,
                                const std::optional<at::Tensor> &residual, bool glu) {
    TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(2) == 128 && packed.scalar_type() == at::kByte,
                      "cpu_q4_linear: packed must be uint8 [N/8, K/32, 128], got ", packed.scalar_type(), " ",
                      packed.sizes());
    const int64_t N = packed.size(0) * 8, K = packed.size(1) * 32;
    const Around a = around("cpu_q4_linear", x, K, N, norm_weight, eps, residual, glu);
    TORCH_CHECK_VALUE(group_size > 0 && group_size % 32 == 0 && K % group_size == 0 &&
                          scales_zeros.sizes() == at::IntArrayRef({N / 8, K / group_size, 2, 8}) &&
                          scales_zeros.scalar_type() == at::kBFloat16,
                      "cpu_q4_linear: needs a group size that is a multiple of 32 dividing K=", K,
                      " and scales_zeros bf16 [N/8, K/G, 2, 8]; got G=", group_size, ", ", scales_zeros.scalar_type(),
                      " ", scales_zeros.sizes());
    const int64_t M = x.size(0), G = group_size;
    at::Tensor w = packed.contiguous(), sz = scales_zeros.contiguous();
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0) return finish(a, y);
    std::vector<int8_t> xq(M * K);
    std::vector<float> xn, xd(M * (K / 32)), xs(M * (K / G));
    quantize_rows(normed(a, xn), M, K, G, xq.data(), xd.data(), xs.data());
    const uint8_t *wp = w.data_ptr<uint8_t>();
    const uint16_t *szp = static_cast<const uint16_t *>(sz.data_ptr());
    float *yp = y.data_ptr<float>();
    #pragma omp parallel
    {
        THREAD_PART(N / 8, t0, t1)
        q4_tiles(t0, t1, M, N, K, G, wp, szp, xq.data(), xd.data(), xs.data(), yp);
    }
    return finish(a, y);
}

static at::Tensor cpu_q8_linear(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &scales,
                                const std::optional<at::Tensor> &norm_weight, double eps,
                                const std::optional<at::Tensor> &residual, bool glu) {
    TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) % 32 == 0,
                      "cpu_q8_linear: weight must be int8 [N, K] with K a multiple of 32, got ", weight.scalar_type(),
                      " ", weight.sizes());
    const int64_t N = weight.size(0), K = weight.size(1);
    const Around a = around("cpu_q8_linear", x, K, N, norm_weight, eps, residual, glu);
    TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == N && scales.scalar_type() == at::kBFloat16,
                      "cpu_q8_linear: scales must be bf16 [", N, "], got ", scales.scalar_type(), " ", scales.sizes());
    const int64_t M = x.size(0);
    at::Tensor w = weight.contiguous(), sc = scales.contiguous();
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0) return finish(a, y);
    std::vector<int8_t> xq(M * K);
    std::vector<float> xn, xd(M * (K / 32));
    quantize_rows(normed(a, xn), M, K, 0, xq.data(), xd.data(), nullptr);
    const int8_t *wp = w.data_ptr<int8_t>();
    const uint16_t *scp = static_cast<const uint16_t *>(sc.data_ptr());
    float *yp = y.data_ptr<float>();
    #pragma omp parallel
    {
        THREAD_PART(N, n0, n1)
        q8_rows(n0, n1, M, N, K, wp, scp, xq.data(), xd.data(), yp);
    }
    return finish(a, y);
}

/* kv.py's decode_attention on the CPU: stores the step's k, v at slot pos[b] of each row, then attends over
   slots lo..pos[b] (lo = pos - window + 1 with a window, else 0), one (row, head) per task */
static at::Tensor cpu_decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                       const at::Tensor &k_cache, const at::Tensor &v_cache, const at::Tensor &pos,
                                       int64_t window) {
    TORCH_CHECK_VALUE(q.dim() == 4 && q.size(2) == 1 && k_cache.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                      "cpu_decode_attention: q [B, H, 1, D], k and v [B, Hkv, 1, D], caches [Bc, Hkv, S, D]; got q ",
                      q.sizes(), ", cache ", k_cache.sizes());
    const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k_cache.size(1), S = k_cache.size(2);
    TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                          k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
                      "cpu_decode_attention: fp32 only, got q ", q.scalar_type(), ", cache ", k_cache.scalar_type());
    TORCH_CHECK_VALUE(D % 8 == 0 && Hkv > 0 && H % Hkv == 0 && k_cache.size(0) >= B && k_cache.size(3) == D &&
                          k.sizes() == at::IntArrayRef({B, Hkv, 1, D}) && v.sizes() == k.sizes() &&
                          k_cache.strides() == v_cache.strides() && k_cache.sizes() == v_cache.sizes() &&
                          k_cache.stride(3) == 1,
                      "cpu_decode_attention: needs D % 8 == 0, H a multiple of Hkv, caches of one shape and strides "
                      "(unit along D); got q ", q.sizes(), ", k ", k.sizes(), ", cache ", k_cache.sizes(), " strides ",
                      k_cache.strides());
    TORCH_CHECK_VALUE(pos.dim() == 1 && pos.size(0) == B && pos.scalar_type() == at::kLong,
                      "cpu_decode_attention: pos must be int64 [B], got ", pos.scalar_type(), " ", pos.sizes());
    at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous(), kc = k.stride(3) == 1 ? k : k.contiguous();
    at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
    const int64_t *pp = pos.data_ptr<int64_t>(), sp = pos.stride(0);
    float *kcp = k_cache.data_ptr<float>(), *vcp = v_cache.data_ptr<float>();
    const int64_t sb = k_cache.stride(0), sh = k_cache.stride(1), ss = k_cache.stride(2);
    for (int64_t b = 0; b < B; b++) {
        const int64_t p = pp[b * sp];
        TORCH_CHECK_INDEX(p >= 0 && p < S, "cpu_decode_attention: position ", p, " of row ", b, " is outside the cache's ",
                          S, " slots");
        for (int64_t h = 0; h < Hkv; h++) {
            std::memcpy(kcp + b * sb + h * sh + p * ss, kc.data_ptr<float>() + b * kc.stride(0) + h * kc.stride(1),
                        D * sizeof(float));
            std::memcpy(vcp + b * sb + h * sh + p * ss, vc.data_ptr<float>() + b * vc.stride(0) + h * vc.stride(1),
                        D * sizeof(float));
        }
    }
    at::Tensor out = at::empty({B, H, 1, D}, q.options());
    const float *qp = qc.data_ptr<float>();
    float *op = out.data_ptr<float>();
    const int64_t group = H / Hkv, sqb = qc.stride(0), sqh = qc.stride(1);
    #pragma omp parallel
    {
        std::vector<float> scores(S + 8);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * H; task++) {
            const int64_t b = task / H, h = task % H, p = pp[b * sp];
            const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const float *kb = kcp + b * sb + (h / group) * sh + lo * ss, *vb = vcp + b * sb + (h / group) * sh + lo * ss;
            if (D == 64) attend_one<8>(qp + b * sqb + h * sqh, kb, vb, ss, p - lo + 1, D, scores.data(), op + task * D);
            else attend_one<0>(qp + b * sqb + h * sqh, kb, vb, ss, p - lo + 1, D, scores.data(), op + task * D);
        }
    }
    return out;
}

TORCH_LIBRARY_FRAGMENT(flint, m) {
    m.def("cpu_q4_linear(Tensor x, Tensor packed, Tensor scales_zeros, int group_size, Tensor? norm_weight=None, "
          "float eps=0., Tensor? residual=None, bool glu=False) -> Tensor");
    m.def("cpu_q8_linear(Tensor x, Tensor weight, Tensor scales, Tensor? norm_weight=None, float eps=0., "
          "Tensor? residual=None, bool glu=False) -> Tensor");
    m.def("cpu_decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, "
          "int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(flint, CPU, m) {
    m.impl("cpu_q4_linear", &cpu_q4_linear);
    m.impl("cpu_q8_linear", &cpu_q8_linear);
    m.impl("cpu_decode_attention", &cpu_decode_attention);
}
"""

CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flint")
_loaded = False
_error = None


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def _compile_command(src: str, out: str) -> list[str]:
    from torch.utils import cpp_extension

    lib_dir = cpp_extension.library_paths()[0]
    return [os.environ.get("CXX", "g++"), "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *[f"-I{p}" for p in cpp_extension.include_paths()], src, "-o", out,
            f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-ltorch_cpu", "-lc10"]


def _build() -> str:
    """Compile CPP_SOURCE (once per source, compiler command and torch build) into CACHE_DIR; the .so's path."""
    key = CPP_SOURCE + " ".join(_compile_command("", "")) + torch.__version__
    path = os.path.join(CACHE_DIR, f"cpu_kernels_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(CACHE_DIR, exist_ok=True)
        print("flint: building the CPU kernels (once, ~20 s) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "cpu_kernels.cpp"), os.path.join(tmp, "cpu_kernels.so")
            with open(src, "w") as f:
                f.write(CPP_SOURCE)
            subprocess.run(_compile_command(src, out), check=True, capture_output=True, text=True)
            os.replace(out, path)  # atomic: a concurrent process never loads a half-written file
    return path


def available() -> bool:
    """Whether the ops run here: an x86 CPU with AVX2 and FMA, g++ and torch's headers, FLINT_CPU_KERNELS not 0.
    Built and loaded at the first call; a failure is kept (build_error()) and not retried."""
    global _loaded, _error
    if os.environ.get("FLINT_CPU_KERNELS", "1") == "0":
        return False
    if not _loaded and _error is None:
        if not _cpu_has_avx2():
            _error = "the CPU lacks AVX2/FMA"
        else:
            try:
                torch.ops.load_library(_build())
                _register_fakes()
                _loaded = True
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                _error = f"{e}\n{getattr(e, 'stderr', '') or ''}".strip()
    return _loaded


def build_error() -> str | None:
    return _error


def _register_fakes():
    """Output shapes for torch.compile (the ops are defined in CPP_SOURCE)."""
    torch.library.register_fake("flint::cpu_q4_linear")(
        lambda x, packed, scales_zeros, group_size, norm_weight=None, eps=0.0, residual=None, glu=False:
        x.new_empty(x.shape[0], packed.shape[0] * 8 // (2 if glu else 1)))
    torch.library.register_fake("flint::cpu_q8_linear")(
        lambda x, weight, scales, norm_weight=None, eps=0.0, residual=None, glu=False:
        x.new_empty(x.shape[0], weight.shape[0] // (2 if glu else 1)))
    torch.library.register_fake("flint::cpu_decode_attention")(
        lambda q, k, v, k_cache, v_cache, pos, window: torch.empty_like(q))


def fused_linear(op, weights: tuple, x: torch.Tensor, bias, glu: bool = False, norm=None, residual=None,
                 rope=None) -> torch.Tensor:
    """model.linear's ops around one of the matmul ops, op(x2, *weights, norm_weight, eps, residual, glu) (a
    quantized linear's forward on the CPU): x [..., K] -> residual + RoPE(SwiGLU(RMSNorm(x) @ W^T + bias)). The
    norm, SwiGLU and residual add run inside the op (no separate kernels, no extra pass over the activations);
    RoPE (rope = (cos, sin, heads)) after it as plain ops, and with a bias, or not fp32, all of them are."""
    if bias is not None or x.dtype != torch.float32 or (norm is not None and norm[0].dtype != torch.float32):
        def bare(x_, glu_):
            y = op(x_.reshape(-1, x_.shape[-1]).float(), *weights)
            y = y + bias if bias is not None else y
            return (gemv.silu_mul(y) if glu_ else y).reshape(*x_.shape[:-1], -1).to(x_.dtype)
        return gemv.unfused(bare, x, glu, norm, residual, rope)
    weight, eps = norm if norm is not None else (None, 0.0)
    inside = residual if rope is None else None  # the residual comes after RoPE
    y = op(x.reshape(-1, x.shape[-1]), *weights, weight, float(eps),
           None if inside is None else inside.reshape(-1, inside.shape[-1]), glu)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    if rope is not None:
        cos, sin, heads = rope
        y = gemv.rope_heads(y, cos, sin, heads * cos.shape[-1])
        y = y if residual is None else residual + y
    return y


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x fp32 [..., K] rounded as the matmul ops round it: per block of 32, to int8 steps of amax / 127 (ties to
    even). The ops compute exactly round_activations(x) @ W^T, up to fp32 summation order."""
    blocks = x.float().unflatten(-1, (-1, 32))
    step = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.where(step > 0, torch.round(blocks / step), 0.0) * step).flatten(-2)


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 (N a multiple of 8, K of 32) -> uint8 [N/8, K/32, 128]: per 8 rows and 32 columns,
    4 x 32 bytes; byte 4r + i of the j-th holds row r's code 4j + i (low nibble) and 16 + 4j + i (high)."""
    N, K = q.shape
    c = q.to(torch.uint8).reshape(N // 8, 8, K // 32, 2, 4, 4)  # [tile, row, block, half, j, i]
    c = c.permute(0, 2, 3, 4, 1, 5)  # [tile, block, half, j, row, i]
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N // 8, K // 32, 128).contiguous()


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N/8, K/32, 128] -> int32 codes [N, K] (pack_q4 inverted)."""
    T, B, _ = packed.shape
    p = packed.reshape(T, B, 1, 4, 8, 4)  # [tile, block, 1, j, row, i]
    c = torch.cat([p & 15, p >> 4], dim=2)  # [tile, block, half, j, row, i]
    return c.permute(0, 4, 1, 2, 3, 5).reshape(T * 8, B * 32).to(torch.int32)


def pack_scales(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """scales, zeros [N, K/G] -> bf16 [N/8, K/G, 2, 8] (8 rows' scales, then their zeros, per group)."""
    N, n_groups = scales.shape
    sz = torch.stack([scales.float(), zeros.float()], dim=-1).reshape(N // 8, 8, n_groups, 2)
    return sz.permute(0, 2, 3, 1).to(torch.bfloat16).contiguous()


def unpack_scales(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [N/8, K/G, 2, 8] -> fp32 (scales, zeros), each [N, K/G]."""
    s = sz.float().permute(0, 3, 1, 2).reshape(sz.shape[0] * 8, sz.shape[1], 2)
    return s[..., 0], s[..., 1]


def supports_q4(out_features: int, k: int, group_size: int) -> bool:
    """Whether q4_linear takes this shape (else quantize.py keeps ATen's kernel)."""
    return out_features % 8 == 0 and k % 32 == 0 and group_size % 32 == 0 and k % group_size == 0
