"""gemv.py: every kernel config against the dequantized fp32 reference, the custom ops under torch.compile,
bench.py gemv end to end, quantize.py's modules in the gemv layout.

Without a GPU the kernels run on CPU tensors through Triton's interpreter, which must be switched on before
triton (and gemv's kernels) are first imported, hence the first lines; with one they run on it. Triton's
interpreter (3.7 to 3.9) gets three bf16 operations wrong, which the GPU gets right; _fix_interpreter_bf16
patches them (see there). Tolerance: the kernels round their output to bf16 (<= 2^-8 relative, round to
nearest) after fp32 sums in their own order, so |y - ref| <= 2^-7 |ref| + 2^-9 max|ref| (twice the rounding,
plus room for elements near zero; the fp32 cancellation of int4's 128 + q trick is far below both).
"""
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import gemv  # noqa: E402
import quantize as Q  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def _fix_interpreter_bf16():
    """Triton's interpreter stores bf16 as uint16 and (1) tl.dot multiplies those uint16 bit patterns,
    (2) an int -> bf16 cast writes the integer as the bits, (3) fp32 -> bf16 truncates instead of rounding
    to nearest even. Patch the three to what the GPU does; a later interpreter that fixed them is unharmed."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl") or not hasattr(builder, "create_dot"):
        return
    cast, dot = builder.cast_impl, builder.create_dot

    def to_f32(h):
        if h.dtype.scalar == tl.bfloat16:
            return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
            f = cast(self, src, tl.float32).data if src.dtype.scalar != tl.float32 else src.data
            bits = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32).astype(np.uint64)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even (no NaNs here)
            return interp.TensorHandle(bits.astype(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, *args):
        return dot(self, to_f32(a), to_f32(b), d, *args)

    builder.cast_impl, builder.create_dot = cast_impl, create_dot


if not CUDA:
    _fix_interpreter_bf16()


def close(y, ref):
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape and y.device.type == DEVICE
    err = (y.float().cpu() - ref).abs()
    bound = 2 ** -7 * ref.abs() + 2 ** -9 * ref.abs().max()
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"


def problem(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g) + torch.randn(N, 1, generator=g)  # offset rows: zeros matter in int4
    return x, w


def code_path(cfg) -> tuple:
    """What a config changes in a kernel's code rather than its sizes: the kernel (with "+silu"), cp.async stages,
    a K split, tiles or groups loaded ahead."""
    kernel = cfg[0]
    base = kernel.removesuffix("+silu")
    if base in ("int4_fma", "int4_h2", "int4_h2p", "int4_mma"):  # (kernel, BLOCK_N, split, warps, ahead)
        return kernel, cfg[2] > 1, cfg[4]
    if base in ("int4_dot", "dequant"):
        return (kernel,)
    stages, split, ahead = gemv._unpack(cfg)[4:]
    return kernel, stages > 1, split > 1, ahead


def under_test(configs, every: bool, path=code_path) -> list:
    """every: all the configs (the slow run, -m slow); else the first of each code path (path), which runs
    every kernel, epilogue, split and prefetch variant in the default run at a third of the interpreter's time."""
    if every:
        return list(configs)
    first = {}
    for cfg in configs:
        first.setdefault(path(cfg), cfg)
    return list(first.values())


# the every-config tests run twice: a config per code path by default, all of them marked slow
EVERY = pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)])


# M in {1, 3, 8, 20} (fma, fma and dot, dot, dot with 32 rows or dequantize); N odd or not a multiple of any
# BLOCK_N; K not a multiple of BLOCK_K (int8/bf16: 320; int4 with G=64: 5 groups, not a multiple of the
# groups per step)
SHAPES = [(1, 97, 320), (3, 160, 256), (8, 131, 320), (20, 48, 320)]


@EVERY
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_bf16_every_config(M, N, K, every):
    x, w = problem(M, N, K)
    wb = w.to(torch.bfloat16)
    ref = x.float() @ wb.float().t()
    x, wb = x.to(DEVICE), wb.to(DEVICE)
    for cfg in under_test(gemv.candidates("bf16", M, K), every):
        close(gemv._run_dense(x, wb, None, cfg), ref)
    close(gemv.bf16_linear(x, wb), ref)


@EVERY
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_every_config(M, N, K, every):
    x, w = problem(M, N, K)
    q, scales = Q.int8_quantize(w)
    ref = x.float() @ (q.float() * scales.float()[:, None]).t()
    x, q, scales = x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE)
    for cfg in under_test(gemv.candidates("int8", M, K), every):
        close(gemv._run_dense(x, q, scales, cfg), ref)
    close(gemv.int8_linear(x, q, scales), ref)


@EVERY
@pytest.mark.parametrize("op", ["bf16", "int8"])
@pytest.mark.parametrize("M,N,K", [(1, 97, 320), (1, 64, 512), (8, 131, 320)])
def test_peeled_first_step_every_config(monkeypatch, op, M, N, K, every):
    # on Hopper (PDL) the dense kernels read W's first tile before waiting for the previous kernel, and
    # run the loop from the second tile: the same sums (K = 320: a partial first tile; 512: whole tiles)
    monkeypatch.setattr(gemv, "_PEEL_WITHOUT_PDL", True)
    x, w = problem(M, N, K)
    if op == "bf16":
        w, scales = w.to(torch.bfloat16), None
        ref = x.float() @ w.float().t()
    else:
        w, scales = Q.int8_quantize(w)
        ref = x.float() @ (w.float() * scales.float()[:, None]).t()
        scales = scales.to(DEVICE)
    x, w = x.to(DEVICE), w.to(DEVICE)
    for cfg in under_test(gemv.candidates(op, M, K), every):
        if cfg != gemv.DEQUANT:
            close(gemv._run_dense(x, w, scales, cfg), ref)


def int4_problem(M, N, K, group_size):
    x, w = problem(M, N, K)
    scales, zeros = Q.int4_grid(w, group_size)
    q = Q.int4_codes(w, scales, zeros)
    sz = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16)  # [N, K/G, 2]
    ref = x.float() @ Q.int4_dequantize(q, scales, zeros).t()
    return x.to(DEVICE), Q.pack_nibbles(q).to(DEVICE), sz.to(DEVICE), ref


@EVERY
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 3, 8, 20])
def test_int4_every_config(M, group_size, every):
    N, K = (97, 320) if group_size != 128 else (131, 384)  # 10 / 5 / 3 groups per row
    x, packed, sz, ref = int4_problem(M, N, K, group_size)
    for cfg in under_test(gemv.candidates("int4", M, K, group_size), every):
        close(gemv._run_int4(x, packed, sz, group_size, cfg), ref)
    close(gemv.int4_linear(x, packed, sz, group_size), ref)


@pytest.mark.parametrize("kernel", ["int4_fma", "int4_h2"])
def test_int4_k_split_leaves_its_counters_at_zero(kernel):
    # int4_fma / int4_h2 with a K split: the last program of each row block adds the partial sums and resets
    # its counter, so a second call (and a graph replay) starts from zero and gives the same result
    M, G = 3, 32
    x, packed, sz, ref = int4_problem(M, 97, 320, G)  # 10 groups over 4 splits: 3, 3, 3, 1
    cfg = (kernel, 32, 4, 1, 1)
    first = gemv._run_int4(x, packed, sz, G, cfg)
    close(first, ref)
    assert torch.equal(gemv._run_int4(x, packed, sz, G, cfg), first)
    assert all(int(count.abs().sum()) == 0 for _, count in gemv._split_buffers.values())


@EVERY
@pytest.mark.parametrize("M", [1, 3])
def test_h2_kernels_every_config_every_row(M, every):
    # int8_h2 / int4_h2 (fp16x2 products) run one program per row of x like the fma kernels; the tuner offers
    # them at one row today, any row count must still be right
    x, w = problem(M, 97, 320)
    q, scales = Q.int8_quantize(w)
    ref = x.float() @ (q.float() * scales.float()[:, None]).t()
    x, q, scales = x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE)
    for cfg in under_test([c for c in gemv._FMA_INT8 if c[0] == "int8_h2"], every):
        close(gemv._run_dense(x, q, scales, cfg), ref)
    x4, packed, sz, ref4 = int4_problem(M, 131, 384, 128)
    for cfg in under_test(gemv._H2_INT4, every):
        close(gemv._run_int4(x4, packed, sz, 128, cfg), ref4)


def test_mma_kernels_ahead_splits_and_rows():
    # int8_mma / int4_mma (tensor cores: rows of x are the mma's 8 columns, so one program serves 1..8 rows;
    # the candidate tests above run them at M = 3 and 8): here 5 and 2 rows, no tiles loaded ahead or two, a
    # ragged K (int8: 320 = 2.5 steps of 128), K splits that leave splits empty (int8: 4 steps over 8 splits,
    # int4: 3 groups over 4 splits).
    # Under the interpreter mma_rows multiplies the lanes' registers, on a GPU mma.sync itself.
    x, w = problem(5, 97, 320)
    q, scales = Q.int8_quantize(w)
    ref = x.float() @ (q.float() * scales.float()[:, None]).t()
    x, q, scales = x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE)
    for cfg in [("int8_mma", 16, 64, 1, 1, 3, 0), ("int8_mma", 32, 128, 1, 1, 2, 1), ("int8_mma", 16, 256, 1, 1, 2, 2)]:
        close(gemv._run_dense(x, q, scales, cfg), ref)
    x, w = problem(2, 40, 256)  # whole steps, 4 of 64 columns over 8 splits: four splits empty
    q, scales = Q.int8_quantize(w)
    ref = x.float() @ (q.float() * scales.float()[:, None]).t()
    close(gemv._run_dense(x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), ("int8_mma", 16, 64, 1, 1, 8, 2)), ref)
    x4, packed, sz, ref4 = int4_problem(5, 41, 384, 128)
    for cfg in [("int4_mma", 16, 4, 1, 0), ("int4_mma", 32, 4, 1, 1)]:
        close(gemv._run_int4(x4, packed, sz, 128, cfg), ref4)
    # bf16_mma: 5 rows, a ragged K (330 = 5 steps of 64 and 10 columns; 2.6 steps of 128), two tiles a warp,
    # no step / two steps ahead, splits of which some are empty; then 2 rows over whole steps
    x, w = problem(5, 97, 330)
    wb = w.to(torch.bfloat16)
    ref = x.float() @ wb.float().t()
    for cfg in [("bf16_mma", 16, 64, 1, 1, 3, 0), ("bf16_mma", 32, 128, 1, 1, 2, 1), ("bf16_mma", 16, 32, 1, 1, 16, 2)]:
        close(gemv._run_dense(x.to(DEVICE), wb.to(DEVICE), None, cfg), ref)
    x, w = problem(2, 40, 256)
    wb = w.to(torch.bfloat16)
    close(gemv._run_dense(x.to(DEVICE), wb.to(DEVICE), None, ("bf16_mma", 16, 64, 1, 1, 8, 2)), x.float() @ wb.float().t())
    assert all(int(count.abs().sum()) == 0 for _, count in gemv._split_buffers.values())
    for M in (2, 8):  # from 2 rows (at one the h2 and fma kernels win every shape)
        assert all(c in gemv.candidates("int8", M, 4096) for c in gemv._MMA_INT8)
        assert all(c in gemv.candidates("int4", M, 4096, 128) for c in gemv._MMA_INT4)
        assert all(c in gemv.candidates("bf16", M, 4096) for c in gemv._MMA_BF16)
    assert not any(c[0].endswith("_mma") for op in ("int8", "int4", "bf16") for c in gemv.candidates(op, 1, 4096, 128))


def glu_ref(y):
    """SiLU(gate) * up of y [M, 2F] = [gate, up] in fp32."""
    gate, up = y.float().cpu().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@EVERY
@pytest.mark.parametrize("op", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("M", [1, 3])  # 3 rows: fma, mma and dot kernels (mma's second row of a lane too)
def test_glu_epilogue_every_config(op, M, every):
    # glu=True (W = [gate; up]): the fma, h2 and mma kernels pair each gate row with its up row in a program
    # and store SiLU(gate) * up; dot and dequantize run silu_mul after. Either way the sums are the plain
    # call's, so the result is silu_mul of the plain output (one bf16 rounding of an fp32 product) to within
    # an ulp, and near the fp32 reference. F = 49 outputs: no BLOCK_N / 2 divides it (the last pair block is
    # partly past the end).
    F_, K, G = 49, 320, 64
    x, w = problem(M, 2 * F_, K)
    if op == "int4":
        x, packed, sz, ref = int4_problem(M, 2 * F_, K, G)
        run = lambda cfg, glu: gemv._run_int4(x, packed, sz, G, cfg, glu)  # noqa: E731
        op_call = lambda: gemv.int4_linear(x, packed, sz, G, True)  # noqa: E731
    else:
        if op == "bf16":
            wq, scales = w.to(torch.bfloat16), None
            ref = x.float() @ wq.float().t()
        else:
            wq, scales = Q.int8_quantize(w)
            ref = x.float() @ (wq.float() * scales.float()[:, None]).t()
            scales = scales.to(DEVICE)
        x, wq = x.to(DEVICE), wq.to(DEVICE)
        run = lambda cfg, glu: gemv._run_dense(x, wq, scales, cfg, glu)  # noqa: E731
        op_call = ((lambda: gemv.bf16_linear(x, wq, True)) if op == "bf16"  # noqa: E731
                   else (lambda: gemv.int8_linear(x, wq, scales, True)))
    want = glu_ref(ref)
    bound = 2 ** -6 * want.abs() + 2 ** -8 * want.abs().max()
    configs = under_test(gemv.candidates(op, M, K, G if op == "int4" else 0, glu=True), every)
    assert any(c[0].endswith("+silu") for c in configs)
    fused_kinds = [c for c in configs if not c[0].endswith("+silu")]
    for cfg in fused_kinds + [c for c in configs if c not in fused_kinds][:2]:  # "+silu": plain, then silu_mul
        fused = run(cfg, True)
        assert fused.shape == (M, F_) and fused.dtype == torch.bfloat16
        exact = glu_ref(run(cfg, False))
        assert ((fused.float().cpu() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all(), cfg
        assert ((fused.float().cpu() - want).abs() <= bound).all(), cfg
    assert ((op_call().float().cpu() - want).abs() <= bound).all()
    assert all(int(count.abs().sum()) == 0 for _, count in gemv._split_buffers.values())


def test_int4_pipelined_loads_give_the_same_sums():
    # "int4_h2p" (pin it with FLINT_GEMV_PICKS; not a tuning candidate until measured): int4_h2 with its group loads
    # pipelined by Triton (cp.async, the config's fifth number the stages), the same sums as int4_h2; K splits,
    # GLU, the norm and the residual
    x, packed, sz, ref = int4_problem(1, 98, 640, 128)
    for cfg in [("int4_h2p", 32, 2, 1, 3), ("int4_h2p", 64, 1, 2, 4)]:
        plain = ("int4_h2",) + cfg[1:4] + (0,)  # the same rows, split and warps: the same order of sums
        assert torch.equal(gemv._run_int4(x, packed, sz, 128, cfg), gemv._run_int4(x, packed, sz, 128, plain)), cfg
        assert torch.equal(gemv._run_int4(x, packed, sz, 128, cfg, True),
                           gemv._run_int4(x, packed, sz, 128, plain, True)), cfg
    g = torch.ones(640, dtype=torch.bfloat16, device=DEVICE)
    r = torch.ones(1, 98, dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(gemv._run_int4(x, packed, sz, 128, ("int4_h2p", 32, 2, 1, 3), False, (g, 1e-5), r),
                       gemv._run_int4(x, packed, sz, 128, ("int4_h2", 32, 2, 1, 0), False, (g, 1e-5), r))


def test_glu_epilogue_with_k_splits_and_bad_shapes():
    # K splits (the last program of a pair block adds the partials, then pairs them), an mma tile row past
    # F, and an odd number of rows, which has no [gate; up] halves
    x, w = problem(2, 2 * 21, 320)
    q, scales = Q.int8_quantize(w)
    ref = glu_ref(x.float() @ (q.float() * scales.float()[:, None]).t())
    x, q, scales = x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE)
    for cfg in [("fma", 8, 256, 4, 1, 4, 1), ("int8_h2", 8, 64, 4, 1, 3, 1), ("int8_mma", 16, 64, 1, 1, 3, 0),
                ("int8_mma", 32, 128, 1, 1, 2, 1)]:
        y = gemv._run_dense(x, q, scales, cfg, True)
        assert ((y.float().cpu() - ref).abs() <= 2 ** -6 * ref.abs() + 2 ** -8 * ref.abs().max()).all(), cfg
    x4, packed, sz, ref4 = int4_problem(2, 2 * 21, 384, 128)
    for cfg in [("int4_h2", 32, 2, 1, 1), ("int4_mma", 16, 4, 1, 1)]:
        y = gemv._run_int4(x4, packed, sz, 128, cfg, True)
        want = glu_ref(ref4)
        assert ((y.float().cpu() - want).abs() <= 2 ** -6 * want.abs() + 2 ** -8 * want.abs().max()).all(), cfg
    assert all(int(count.abs().sum()) == 0 for _, count in gemv._split_buffers.values())
    # a continuous-batching decode batch (17..64 rows: dequantize + F.linear or dot, then silu_mul's kernel)
    x, w = problem(20, 2 * 21, 320)
    q, scales = Q.int8_quantize(w)
    ref = glu_ref(x.float() @ (q.float() * scales.float()[:, None]).t())
    x, q, scales = x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE)
    for y in (gemv.int8_linear(x, q, scales, True), gemv._run_dense(x, q, scales, gemv._DOT[0], True)):
        assert y.shape == (20, 21)
        assert ((y.float().cpu() - ref).abs() <= 2 ** -6 * ref.abs() + 2 ** -8 * ref.abs().max()).all()
    with pytest.raises(ValueError, match="even number"):
        gemv.bf16_linear(x, torch.zeros(41, 320, dtype=torch.bfloat16, device=DEVICE), True)


def test_feed_forward_uses_the_glu_epilogue(gemv_layout):
    # model.FeedForward asks gate_up_proj for SiLU(gate) * up where the linear fuses it (gemv.Linear, the
    # quantized linears in the gemv layout): the same output as the unfused path, decode rows and prefill
    from model import FeedForward, ModelArgs

    torch.manual_seed(0)
    args = ModelArgs(dim=64, ffn_dim=96, n_heads=4, n_kv_heads=4, n_layers=1, vocab_size=32)
    plain = FeedForward(args).to(DEVICE, torch.bfloat16)
    fused = FeedForward(args).to(DEVICE, torch.bfloat16)
    fused.load_state_dict(plain.state_dict())
    gemv.use_for_linears(fused)
    assert fused.gate_up_proj.fuses_glu
    for rows in (1, 3, gemv.MAX_M + 6):
        x = torch.randn(1, rows, 64, device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():
            want, got = plain(x).float(), fused(x).float()
        assert got.shape == want.shape
        assert ((got - want).abs() <= 2 ** -5 * want.abs() + 2 ** -7 * want.abs().max()).all(), rows
    q = Q.Int8Linear.from_float(plain.gate_up_proj.float())
    assert q.fuses_glu
    x = torch.randn(2, 64, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(q(x, glu=True).float(), glu_ref(q(x)).to(DEVICE), atol=2e-2, rtol=2e-2)


@EVERY
@pytest.mark.parametrize("op", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("peel", [False, True])
def test_norm_prologue_and_residual_epilogue_every_config(monkeypatch, op, peel, every):
    # norm_weight: the op multiplies RMSNorm(x) (model.RMSNorm's arithmetic), the fma and h2 kernels normalizing
    # x as they read it (each program reads its row whole for the rms); residual: added as the kernels store.
    # Every one-row candidate (those without them: the norm and the add as plain ops) against
    # residual + plain(rms_norm(x)): the same sums, so within an ulp or two of bf16 (the kernel's rsqrt and
    # sum order may round an element of the normalized x the other way); with GLU too; K splits; the peeled
    # first step (PDL's path). x of a few hundred, as a residual stream is: the h2 kernels' fp16 products need
    # the normalized x, not the raw one.
    monkeypatch.setattr(gemv, "_PEEL_WITHOUT_PDL", peel)
    N, K, G = 98, 384, 64
    x, w = problem(1, N, K)
    x = (x.float() * 300).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    g = (1 + 0.5 * torch.randn(K, generator=gen)).to(torch.bfloat16)
    res = (10 * torch.randn(1, N, generator=gen)).to(torch.bfloat16)
    res_glu = (10 * torch.randn(1, N // 2, generator=gen)).to(torch.bfloat16)
    if op == "int4":
        x, packed, sz, _ = int4_problem(1, N, K, G)
        x = (x.float().cpu() * 300).to(torch.bfloat16).to(DEVICE)
        run = lambda cfg, xx, glu, norm, r: gemv._run_int4(xx, packed, sz, G, cfg, glu, norm, r)  # noqa: E731
    else:
        wq, scales = (w.to(torch.bfloat16), None) if op == "bf16" else Q.int8_quantize(w)
        wq, scales = wq.to(DEVICE), None if scales is None else scales.to(DEVICE)
        run = lambda cfg, xx, glu, norm, r: gemv._run_dense(xx, wq, scales, cfg, glu, norm, r)  # noqa: E731
    x, g, res, res_glu = x.to(DEVICE), g.to(DEVICE), res.to(DEVICE), res_glu.to(DEVICE)
    xn = gemv.rms_norm(x, g, 1e-5)
    for glu in (False, True):
        r = res_glu if glu else res
        configs = under_test(gemv.candidates(op, 1, K, G if op == "int4" else 0, glu=glu), every)
        configs += [("fma", 8, 128, 4, 1, 2, 1)] if op != "int4" else [("int4_h2", 32, 3, 1, 1)]  # K splits
        for cfg in configs:
            want = (run(cfg, xn, glu, None, None).float() + r.float()).cpu()
            got = run(cfg, x, glu, (g, 1e-5), r).float().cpu()
            assert got.shape == want.shape
            err = (got - want).abs()
            assert (err <= 2 ** -7 * want.abs() + 2 ** -9 * want.abs().max()).all(), (cfg, glu, err.max())
    # the op: its own tuning key, the same result
    if op == "bf16":
        got = gemv.bf16_linear(x, wq, False, g, 1e-5, res)
    elif op == "int8":
        got = gemv.int8_linear(x, wq, scales, False, g, 1e-5, res)
    else:
        got = gemv.int4_linear(x, packed, sz, G, False, g, 1e-5, res)
    want = (run(gemv.candidates(op, 1, K, G)[0], xn, False, None, None).float() + res.float()).cpu()
    assert ((got.float().cpu() - want).abs() <= 2 ** -7 * want.abs() + 2 ** -9 * want.abs().max()).all()
    assert all(int(count.abs().sum()) == 0 for _, count in gemv._split_buffers.values())
    with pytest.raises(ValueError, match="residual"):
        run(gemv.candidates(op, 1, K, G)[0], x, False, None, res[:, :5].contiguous())


@EVERY
@pytest.mark.parametrize("op", ["bf16", "int8", "int4"])
def test_rope_epilogue_every_config(op, every):
    # rope = (cos, sin [M, D], rows): the fma and h2 kernels whose BLOCK_N divides the head dim take rows i and
    # i + D/2 of a head into one program and rotate them as they store (the q and k heads: the first rows
    # outputs; v's rows stay); the others rotate after. Against rope_heads of the plain output (RoPE of the
    # stored bf16 values in fp32, rounded once): within an ulp; K splits; with the norm prologue too.
    D, heads, rot_heads, K, G = 16, 7, 5, 256, 64
    N = heads * D
    x, w = problem(1, N, K)
    gen = torch.Generator().manual_seed(2)
    angle = torch.randn(1, D // 2, generator=gen) * 3
    cos = torch.cat((angle.cos(), angle.cos()), -1).to(torch.bfloat16).to(DEVICE)
    sin = torch.cat((angle.sin(), angle.sin()), -1).to(torch.bfloat16).to(DEVICE)
    g = (1 + 0.5 * torch.randn(K, generator=gen)).to(torch.bfloat16).to(DEVICE)
    if op == "int4":
        x, packed, sz, _ = int4_problem(1, N, K, G)
        run = lambda cfg, xx, norm, rope: gemv._run_int4(xx, packed, sz, G, cfg, False, norm, None, rope)  # noqa: E731
    else:
        wq, scales = (w.to(torch.bfloat16), None) if op == "bf16" else Q.int8_quantize(w)
        wq, scales = wq.to(DEVICE), None if scales is None else scales.to(DEVICE)
        run = lambda cfg, xx, norm, rope: gemv._run_dense(xx, wq, scales, cfg, False, norm, None, rope)  # noqa: E731
    x = x.to(DEVICE)
    rope = (cos, sin, rot_heads * D)
    # a config's BLOCK_N decides whether RoPE goes into its epilogue: both kinds of each code path
    configs = under_test(gemv.candidates(op, 1, K, G if op == "int4" else 0), every,
                         path=lambda c: (code_path(c), gemv._rope_fits(c, rope, False, None)))
    configs += [("fma", 8, 128, 4, 1, 2, 1)] if op != "int4" else [("int4_h2", 16, 3, 1, 1)]  # K splits
    assert any(gemv._rope_fits(c, rope, False, None) for c in configs)
    for norm in (None, (g, 1e-5)):
        xn = x if norm is None else gemv.rms_norm(x, *norm)
        for cfg in configs:
            want = gemv.rope_heads(run(cfg, xn, None, None), cos[:, None], sin[:, None], rot_heads * D).float().cpu()
            got = run(cfg, x, norm, rope).float().cpu()
            err = (got - want).abs()
            assert (err <= 2 ** -7 * want.abs() + 2 ** -9 * want.abs().max()).all(), (cfg, norm is None, err.max())
    assert torch.equal(got[:, rot_heads * D:], run(cfg, x, (g, 1e-5), None).float().cpu()[:, rot_heads * D:])  # v
    with pytest.raises(ValueError, match="RoPE"):
        gemv.bf16_linear(x, torch.zeros(N, K, dtype=torch.bfloat16, device=DEVICE), False, None, 0.0, None, cos,
                         sin, 3)


@pytest.mark.parametrize("rope_in_kernel", ["0", "1"])
def test_block_fuses_its_norms_and_adds(gemv_layout, rope_in_kernel):
    # model.Block hands its RMSNorms and residual adds to the linears (model.linear): gemv.Linear and the
    # quantized linears in the gemv layout take them into their kernels at one row (fusable), the plain ops at
    # more rows; the block's output matches the same block on plain nn.Linears, bf16, for one row and a prefill
    from model import Block, ModelArgs, rope_cos_sin, rope_inv_freq

    gemv_layout.setenv("FLINT_GEMV_ROPE", rope_in_kernel)
    torch.manual_seed(0)
    args = ModelArgs(dim=64, ffn_dim=96, n_heads=4, n_kv_heads=2, n_layers=1, vocab_size=32)
    plain = Block(args, 0).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        for norm in (plain.input_layernorm, plain.post_attention_layernorm):
            norm.weight.copy_(1 + 0.3 * torch.randn(64))
    fused = Block(args, 0).to(DEVICE, torch.bfloat16)
    fused.load_state_dict(plain.state_dict())
    gemv.use_for_linears(fused)
    quant = Block(args, 0).to(DEVICE, torch.bfloat16)
    quant.load_state_dict(plain.state_dict())
    for name in ("qkv_proj", "o_proj"):
        setattr(quant.self_attn, name, Q.Int8Linear.from_float(getattr(plain.self_attn, name)))
    for name in ("gate_up_proj", "down_proj"):
        setattr(quant.mlp, name, Q.Int4Linear.from_float(getattr(plain.mlp, name), 32))
    quant_ref = Block(args, 0).to(DEVICE, torch.bfloat16)
    quant_ref.load_state_dict(plain.state_dict())
    with torch.no_grad():
        quant_ref.self_attn.qkv_proj.weight.copy_(quant.self_attn.qkv_proj.dequantize())
        quant_ref.self_attn.o_proj.weight.copy_(quant.self_attn.o_proj.dequantize())
        quant_ref.mlp.gate_up_proj.weight.copy_(quant.mlp.gate_up_proj.dequantize())
        quant_ref.mlp.down_proj.weight.copy_(quant.mlp.down_proj.dequantize())
    calls = []
    for name, n_args in (("_run_dense", 8), ("_run_int4", 9)):  # (..., norm, residual, rope) last
        def spy(*a, _run=getattr(gemv, name), _n=n_args):
            full = a + (None,) * (_n - len(a))
            calls.append((a[0].shape[0], any(v is not None for v in full[-3:])))  # (rows, norm, residual or rope)
            return _run(*a)
        gemv_layout.setattr(gemv, name, spy)
    inv_freq, factor = rope_inv_freq(args)
    for T in (1, 5):
        x = (4 * torch.randn(1, T, 64)).to(DEVICE, torch.bfloat16)
        pos = torch.arange(T, device=DEVICE)[None]
        cos, sin = rope_cos_sin(inv_freq.to(DEVICE), pos, factor, torch.bfloat16)
        with torch.no_grad(), gemv.no_tuning():  # on a GPU the tuner's timed launches would count as calls
            for block, ref in ((fused, plain), (quant, quant_ref)):
                want = ref(x, cos, sin, pos, None, None).float()
                got = block(x, cos, sin, pos, None, None).float()
                assert ((got - want).abs() <= 2 ** -5 * want.abs() + 2 ** -6 * want.abs().max()).all(), (T, block)
    # at one row the two blocks' eight linears took their norm, RoPE or residual (four each), at 5 rows none did
    assert sum(1 for rows, fused_ops in calls if rows == 1 and fused_ops) == 8
    assert not any(fused_ops for rows, fused_ops in calls if rows == 5)


def test_bf16_mma_falls_back_where_w_or_x_are_not_words():
    # bf16_mma reads W and x as int32 words of two bf16: an odd K, an odd row stride or more than 8 rows run
    # the default fma config instead, with the same result
    cfg = ("bf16_mma", 16, 64, 1, 1, 2, 1)
    for M, K in [(3, 321), (9, 256)]:
        x, w = problem(M, 40, K)
        wb = w.to(torch.bfloat16)
        close(gemv._run_dense(x.to(DEVICE), wb.to(DEVICE), None, cfg), x.float() @ wb.float().t())
    x, w = problem(2, 40, 257)
    wb = w.to(torch.bfloat16)
    x, wb_view = x[:, :256], wb[:, :256]  # strides 257: rows not word-aligned
    close(gemv._run_dense(x.to(DEVICE), wb_view.to(DEVICE), None, cfg), x.float() @ wb_view.float().t())


def test_fp16_products_can_be_left_out_of_the_candidates(monkeypatch):
    assert any(c[0] == "int8_h2" for c in gemv.candidates("int8", 1, 4096))
    assert any(c[0] == "int4_h2" for c in gemv.candidates("int4", 1, 4096, 128))
    monkeypatch.setenv("FLINT_GEMV_FP16", "0")
    for op in ("int8", "int4"):
        for M in (1, 8):
            configs = gemv.candidates(op, M, 4096, 128 if op == "int4" else 0)
            assert configs and not any(c[0].endswith(("_h2", "_mma")) for c in configs)
    assert all(c in gemv.candidates("bf16", 8, 4096) for c in gemv._MMA_BF16)  # bf16 products: no fp16 in it
    monkeypatch.setenv("FLINT_GEMV_FP16", "1")
    monkeypatch.setenv("FLINT_GEMV_MMA", "0")  # the tensor-core kernels alone
    assert any(c[0] == "int8_h2" for c in gemv.candidates("int8", 1, 4096))
    assert not any(c[0].endswith("_mma") for op in ("int8", "int4", "bf16") for c in gemv.candidates(op, 8, 4096, 128))


def test_int8_and_int4_kernels_take_activations_in_the_thousands():
    # int8_h2 and int4_h2 multiply in fp16 (codes scaled to q/64, fp16 partial sums): a few activations of a few
    # thousand (as some models feed their down projection) must neither overflow nor drown the rest
    x, w = problem(1, 64, 1024)
    x[0, ::97] = 3000.0
    q, scales = Q.int8_quantize(w)
    ref = x.float() @ (q.float() * scales.float()[:, None]).t()
    x, q, scales = x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE)
    for cfg in gemv.candidates("int8", 1, 1024):
        close(gemv._run_dense(x, q, scales, cfg), ref)
    x4, packed, sz, _ = int4_problem(1, 64, 1024, 128)  # and int4_h2 the same
    x4[0, ::97] = 3000.0
    ref4 = x4.float().cpu() @ gemv.int4_dequantize(packed.cpu(), sz.cpu(), 128).float().t()
    for cfg in gemv.candidates("int4", 1, 1024, 128):
        close(gemv._run_int4(x4, packed, sz, 128, cfg), ref4)


@pytest.mark.parametrize("cfg", [("fma", 8, 256, 4, 1, 4, 1), ("fma_prmt", 8, 256, 4, 1, 4, 2),
                                 ("int8_fma", 8, 256, 4, 1, 4, 1), ("int8_fma", 16, 128, 4, 1, 2, 2),
                                 ("int8_h2", 8, 256, 4, 1, 4, 1), ("int8_h2", 16, 128, 4, 1, 2, 0),
                                 ("dot", 16, 128, 1, 3, 4)])
def test_dense_k_split_leaves_its_counters_at_zero(cfg):
    # the fma, int8_fma and dot kernels' K split (int8, K = 640: 5 tiles of 128 or 3 of 256, the last one
    # ragged, over 2 or 4 splits; with 4 one is empty), with tiles loaded ahead: same sums as the reference,
    # counters back at zero, a second call identical
    M = 3 if cfg[0] == "dot" else 1
    x, w = problem(M, 97, 640)
    q, scales = Q.int8_quantize(w)
    ref = x.float() @ (q.float() * scales.float()[:, None]).t()
    x, q, scales = x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE)
    first = gemv._run_dense(x, q, scales, cfg)
    close(first, ref)
    assert torch.equal(gemv._run_dense(x, q, scales, cfg), first)
    assert all(int(count.abs().sum()) == 0 for _, count in gemv._split_buffers.values())


def test_pinned_picks_skip_the_tuner(monkeypatch, tmp_path):
    """FLINT_GEMV_PICKS (a JSON object, or a file with one, as bench.py prints gemv_picks) fixes the config
    of the shapes it names; others keep the tuner's choice."""
    import json

    x, w = problem(1, 97, 320)
    w = w.to(torch.bfloat16).to(DEVICE)
    key = gemv._key("bf16", 1, 97, 320, 0, torch.device(DEVICE))
    name = gemv.pick_name(key)
    assert name == "bf16 M1 N97 K320"
    path = tmp_path / "picks.json"
    path.write_text(json.dumps({name: "fma/16/512/8/1"}))
    for value in (json.dumps({name: "fma/16/512/8/1"}), str(path)):
        monkeypatch.setenv("FLINT_GEMV_PICKS", value)
        monkeypatch.setattr(gemv, "_best", {})
        close(gemv.bf16_linear(x.to(DEVICE), w), x.float() @ w.float().cpu().t())
        assert gemv._best[key] == ("fma", 16, 512, 8, 1)
    monkeypatch.setenv("FLINT_GEMV_PICKS", "[1, 2]")
    monkeypatch.setattr(gemv, "_best", {})
    with pytest.raises(ValueError, match="FLINT_GEMV_PICKS"):
        gemv.bf16_linear(x.to(DEVICE), w)


def test_picks_persist_between_processes(monkeypatch, tmp_path):
    """The tuner's picks go to a JSON file (FLINT_GEMV_CACHE) per context (GPU, versions, gemv.py's hash): a
    later process takes them back untimed while they are still among the candidates."""
    path = tmp_path / "cache" / "picks.json"
    monkeypatch.setenv("FLINT_GEMV_CACHE", str(path))
    key = gemv._key("int4", 1, 4096, 4096, 128, torch.device("cpu"))
    configs = gemv.candidates("int4", 1, 4096, 128)
    assert gemv.stored_pick(key, "gpu A", configs) is None
    gemv.store_pick(key, "gpu A", configs[3])
    other = gemv._key("bf16", 2, 64, 64, 0, torch.device("cpu"))
    gemv.store_pick(other, "gpu A", gemv.DEQUANT)
    gemv.store_pick(key, "gpu B", configs[1])
    assert gemv.stored_pick(key, "gpu A", configs) == configs[3]
    assert gemv.stored_pick(other, "gpu A", gemv.candidates("bf16", 2, 64)) == gemv.DEQUANT
    assert gemv.stored_pick(key, "gpu B", configs) == configs[1]
    assert gemv.stored_pick(key, "gpu C", configs) is None
    assert gemv.stored_pick(key, "gpu A", configs[:3]) is None  # no longer a candidate: tune again
    path.write_text("{not json")
    assert gemv.stored_pick(key, "gpu A", configs) is None
    gemv.store_pick(key, "gpu A", configs[2])  # a broken file is replaced
    assert gemv.stored_pick(key, "gpu A", configs) == configs[2]
    monkeypatch.setenv("FLINT_GEMV_CACHE", "0")
    assert gemv.stored_pick(key, "gpu A", configs) is None
    gemv.store_pick(key, "gpu A", configs[0])
    monkeypatch.setenv("FLINT_GEMV_CACHE", str(path))
    assert gemv.stored_pick(key, "gpu A", configs) == configs[2]


def test_compile_candidates_compiles_without_running(monkeypatch):
    """compile_candidates launches every config as Triton's warmup (compile, no run) and skips configs that
    fail; launches after it, and FLINT_GEMV_PARALLEL_COMPILE=0, run kernels as usual."""
    pytest.importorskip("triton.runtime._async_compile")
    calls = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def warmup(self, *args, grid, **kwargs):
            calls.append(("compile", self.name, grid))

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("run", self.name, grid))

    monkeypatch.setattr(gemv, "_kernels", lambda: {name: Kernel(name) for name in ("a", "b")})
    monkeypatch.setattr(gemv.os, "cpu_count", lambda: 4)

    def launch(cfg, w):
        if cfg == "bad":
            raise RuntimeError("does not fit")
        gemv._launch(cfg, (w,), w)

    gemv.compile_candidates(["a", "bad", "b"], launch, (7,))
    assert calls == [("compile", "a", (7,)), ("compile", "b", (7,))]
    calls.clear()
    launch("a", 3)
    monkeypatch.setenv("FLINT_GEMV_PARALLEL_COMPILE", "0")
    gemv.compile_candidates(["a", "b"], launch, (5,))
    assert calls == [("run", "a", (3,))]


def test_no_tuning_takes_the_default_and_keeps_nothing(monkeypatch):
    monkeypatch.delenv("FLINT_GEMV_PICKS", raising=False)
    monkeypatch.setattr(gemv, "_best", {})
    key = gemv._key("int4", 8, 960, 576, 64, torch.device("cpu"))
    configs = gemv.candidates("int4", 8, 576, 64)

    def launch(*args):
        raise AssertionError("timed")

    with gemv.no_tuning():
        with gemv.no_tuning():
            assert gemv._pick(key, configs, launch, torch.device("cuda")) == configs[0]
        assert gemv._pick(key, configs, launch, torch.device("cuda")) == configs[0]
    assert gemv._untimed == 0 and key not in gemv._best  # a later decode batch of 8 rows still tunes
    gemv._best[key] = configs[2]
    with gemv.no_tuning():
        assert gemv._pick(key, configs, launch, torch.device("cuda")) == configs[2]  # a pick made is used


@pytest.mark.skipif(not CUDA, reason="the tuner times on a GPU only")
def test_tuner_takes_a_stored_pick_without_timing(monkeypatch, tmp_path):
    monkeypatch.setenv("FLINT_GEMV_CACHE", str(tmp_path / "picks.json"))
    monkeypatch.delenv("FLINT_GEMV_PICKS", raising=False)
    monkeypatch.setattr(gemv, "_best", {})
    x, w = problem(1, 384, 512)
    w = w.to(torch.bfloat16)
    ref = x.float() @ w.float().t()
    x, w = x.to(DEVICE), w.to(DEVICE)
    close(gemv.bf16_linear(x, w), ref)
    key = gemv._key("bf16", 1, 384, 512, 0, x.device)
    picked = gemv._best[key]
    monkeypatch.setattr(gemv, "_best", {})  # a new process
    monkeypatch.setattr(gemv, "time_in_graph", lambda *a: pytest.fail("timed again"))
    close(gemv.bf16_linear(x, w), ref)
    assert gemv._best[key] == picked


def test_prefill_rows_fall_back_to_dequantize_and_matmul():
    M, N, K, G = 70, 48, 256, 64  # M > MAX_M
    x, packed, sz, ref = int4_problem(M, N, K, G)
    # F.linear on bf16 weights: each weight rounded to bf16 once more, hence a wider bound
    w = gemv.int4_dequantize(packed, sz, G)
    assert w.dtype == torch.bfloat16 and w.shape == (N, K)
    torch.testing.assert_close(w.float(), Q.int4_dequantize(Q.unpack_nibbles(packed), sz[..., 0].float(),
                                                            sz[..., 1].float()), rtol=2 ** -8, atol=2 ** -8)
    y = gemv.int4_linear(x, packed, sz, G)
    torch.testing.assert_close(y.float().cpu(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    x8, w8 = problem(M, N, K)
    q, scales = Q.int8_quantize(w8)
    ref8 = x8.float() @ (q.float() * scales.float()[:, None]).t()
    y8 = gemv.int8_linear(x8.to(DEVICE), q.to(DEVICE), scales.to(DEVICE))
    torch.testing.assert_close(y8.float().cpu(), ref8, rtol=2e-2, atol=2e-2 * ref8.abs().max().item())


def test_bad_inputs_raise():
    x = torch.randn(1, 64).to(torch.bfloat16)  # (checked before any kernel runs: CPU tensors do)
    with pytest.raises(ValueError, match="bf16"):
        gemv.int8_linear(x.float(), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="columns"):
        gemv.int8_linear(x, torch.zeros(8, 32, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="group size"):
        gemv.int4_linear(x, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 1, 2, dtype=torch.bfloat16), 48)


def test_available():
    assert gemv.available(torch.zeros(1, device=DEVICE))  # without a GPU: the interpreter runs CPU tensors
    assert gemv.available(torch.device(DEVICE))


def test_opcheck():
    x, packed, sz, _ = int4_problem(2, 32, 128, 64)
    q, scales = (t.to(DEVICE) for t in Q.int8_quantize(torch.randn(32, 128)))
    ops = torch.ops.flint
    for op, args in ((ops.int8_linear, (x, q, scales)), (ops.bf16_linear, (x, q.to(torch.bfloat16))),
                     (ops.int4_linear, (x, packed, sz, 64))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiled_fullgraph_calls_the_op_once():
    """torch.compile(fullgraph=True) keeps each op as one opaque call (no graph break) and gets the same
    numbers as eager, with aot_eager (whose graph we can read) and with inductor."""
    import torch._dynamo.testing

    M, N, K, G = 1, 64, 256, 64
    x, packed, sz, _ = int4_problem(M, N, K, G)
    q, scales = (t.to(DEVICE) for t in Q.int8_quantize(torch.randn(N, K)))

    def f(x):
        h = torch.ops.flint.int4_linear(x, packed, sz, G)
        return torch.ops.flint.int8_linear(torch.nn.functional.pad(h, (0, K - N)), q, scales).float().relu()

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
    assert counter.frame_count == 1
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))  # inductor (C++ on CPU), as model.py
    targets = [n.target for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.flint.int4_linear) == 1 and targets.count(torch.ops.flint.int8_linear) == 1


def test_bench_gemv_runs_end_to_end(monkeypatch, capsys):
    """bench.py gemv on tiny shapes: every kernel's output checked against its reference, the whole-model
    rows present (timings not asserted; without a GPU there are no CUDA graphs and no tinygemm)."""
    import json

    import bench

    monkeypatch.setattr(bench, "GEMV_SHAPES", {"qkv": (48, 256), "o": (32, 256), "gate_up": (80, 256),
                                               "down": (32, 512), "lm_head": (72, 256)})
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1.0)
    assert bench.main(["gemv", "--batch-sizes", "1", "--min-mb", "0", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kernels = [r for r in rows if r["bench"] == "gemv"]
    # tinygemm and the three read ceilings (bf16, int8, int4 bytes) per shape: CUDA only
    assert len(kernels) == 5 * (9 if CUDA else 5) and all(r["max_rel_err"] < 1e-2 for r in kernels)
    ceilings = {"bf16 read", "int8 read", "int4 read"}
    expected = set(bench.GEMV_MODEL) if CUDA else set(bench.GEMV_MODEL) - {"int4 today"} - ceilings
    assert {r["variant"] for r in rows if r["bench"] == "gemv_model"} == expected



def test_tune_linears_picks_a_config_for_every_row_bucket_once_per_shape(monkeypatch):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 48, bias=False) for _ in range(3)] + [torch.nn.Linear(48, 40, bias=False)]
    model = torch.nn.Sequential(*layers).to(DEVICE, torch.bfloat16)
    assert gemv.use_for_linears(model) == 4
    calls = []
    forward = gemv.Linear.forward
    monkeypatch.setattr(gemv.Linear, "forward", lambda self, x: calls.append((self.in_features, x.shape[0])) or forward(self, x))
    with torch.no_grad():
        gemv.tune_linears(model, torch.bfloat16, DEVICE)
    buckets = [1, 2, 3, 4, 8, 16, 32, 64]
    assert calls == [(64, r) for r in buckets] + [(48, r) for r in buckets]  # one layer of each shape
    for N, K in ((48, 64), (40, 48)):
        assert all(gemv.config_for("bf16", r, N, K, device=DEVICE) is not None for r in buckets)
    calls.clear()  # only the buckets of given row counts (a paged engine's decode buckets): 8 and 16 rows
    with torch.no_grad():
        gemv.tune_linears(model, torch.bfloat16, DEVICE, [8, 16, 128])
    assert calls == [(64, 8), (64, 16), (48, 8), (48, 16)]

def test_tune_linears_tunes_what_a_decode_step_calls(monkeypatch):
    # a Block's one-row calls: qkv_proj with the norm (and RoPE unless FLINT_GEMV_ROPE=0), gate_up_proj with the
    # norm and GLU; their own tuning keys, picked before a CUDA graph would capture them
    from model import ModelArgs, Transformer

    monkeypatch.setenv("FLINT_GEMV_ROPE", "1")
    args = ModelArgs(dim=64, ffn_dim=96, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=40)
    model = Transformer(args).to(DEVICE, torch.bfloat16)
    gemv.use_for_linears(model)
    with torch.no_grad():
        gemv.tune_linears(model, torch.bfloat16, DEVICE)
    assert gemv.config_for("bf16_norm_rope", 1, 8 * 16, 64, device=DEVICE) is not None
    assert gemv.config_for("bf16_norm_glu", 1, 2 * 96, 64, device=DEVICE) is not None
    assert gemv.config_for("bf16", 1, 64, 64, device=DEVICE) is not None  # o_proj (the residual shares it)


# ---------------------------------------------------------------- quantize.py's modules in the gemv layout

@pytest.fixture
def gemv_layout(monkeypatch):
    """Modules built while this is active take the layout and kernels they would on a CUDA machine with
    Triton (here run by the interpreter). -> the monkeypatch."""
    monkeypatch.setattr(Q, "use_gemv", lambda device: True)
    monkeypatch.delenv("FLINT_GEMV_INT4", raising=False)  # the default: gemv's int4 kernels (0 would be tinygemm)
    return monkeypatch


def test_linear_swap_uses_bf16_gemv_for_few_rows_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.Linear(96, 40, bias=True)).to(DEVICE, torch.bfloat16)
    tied = torch.nn.Linear(96, 40, bias=False).to(DEVICE, torch.bfloat16)
    tied.weight = model[1].weight
    model.append(tied)
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        want_a = model[1](model[0](x))
        want_b = model[2](model[0](x))
        assert gemv.use_for_linears(model) == 3
        assert all(type(m) is gemv.Linear for m in model) and model[2].weight is model[1].weight
        h = model[0](x)
        got_a, got_b = model[1](h), model[2](h)
        long = torch.randn(gemv.MAX_M + 8, 256, device=DEVICE, dtype=torch.bfloat16)  # > MAX_M rows: F.linear
        ref = torch.nn.functional.linear(long, model[0].weight, model[0].bias)
        assert torch.allclose(model[0](long), ref, rtol=2 ** -7, atol=1e-3)
    for got, want in ((got_a, want_a), (got_b, want_b)):
        assert (got.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max() + 1e-3


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_linear_gemv_layout_matches_the_cpu_layout(gemv_layout, group_size):
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 48, bias=True)  # 192 is not a multiple of 128: zero-padded to 256
    m = Q.Int4Linear.from_float(lin, group_size)
    assert m.layout == "gemv" and m.weight.shape == (48, m.k_padded // 2)
    assert m.scales_and_zeros.shape == (48, m.k_padded // group_size, 2)
    for cpu_kernels in ("1", "0"):  # the CPU's layouts: cpu_kernels' where it takes the shape, else ATen's
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Q, "use_gemv", lambda device: False)
            mp.setenv("FLINT_CPU_KERNELS", cpu_kernels)
            ref_m = Q.Int4Linear.from_float(lin, group_size)
        assert ref_m.layout in (("cpu", "cpu_q4") if cpu_kernels == "1" else ("cpu",))
        assert torch.equal(m.codes(), ref_m.codes())
        assert all(torch.equal(a, b) for a, b in zip(m.scales_zeros(), ref_m.scales_zeros()))
        assert torch.equal(m.dequantize(), ref_m.dequantize())
    for rows in (1, 3, 20, 70):  # GEMV kernels, and dequantize + F.linear past 64 rows
        x = torch.randn(rows, 192)
        ref = x.to(torch.bfloat16).float() @ m.dequantize().t() + lin.bias
        torch.testing.assert_close(m(x), ref, atol=2e-2, rtol=1e-2)


def test_int8_linear_gemv_path(gemv_layout):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80, bias=False)
    m = Q.Int8Linear.from_float(lin)
    assert m.gemv
    for rows in (1, 8, 20, 70):
        x = torch.randn(rows, 96)
        ref = x.to(torch.bfloat16).float() @ m.dequantize().t()
        y = m(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref, atol=2e-2, rtol=1e-2)


def test_checkpoints_move_between_layouts(gemv_layout, tmp_path):
    """A model quantized in the gemv layout saves the portable checkpoint: it loads back in the gemv layout
    (identical logits) and in the CPU layout (the same codes and scales, logits up to kernel rounding)."""
    from test_quantize import tiny_model

    model = tiny_model()
    Q.quantize_model(model, "int4", 32)
    assert model.layers[0].mlp.down_proj.layout == "gemv" and model.lm_head.gemv
    tokens = torch.randint(0, 256, (1, 12))
    out = model(tokens)
    Q.save_quantized(model, str(tmp_path))
    loaded, _ = Q.load_quantized(str(tmp_path))
    assert torch.equal(loaded(tokens), out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Q, "use_gemv", lambda device: False)
        cpu, _ = Q.load_quantized(str(tmp_path))
    a, b = model.layers[1].self_attn.qkv_proj, cpu.layers[1].self_attn.qkv_proj
    assert b.layout in ("cpu", "cpu_q4") and torch.equal(a.codes(), b.codes())
    assert torch.equal(a.dequantize(), b.dequantize())
    torch.testing.assert_close(cpu(tokens), out, atol=5e-2, rtol=5e-2)
    assert Q.model_bytes(cpu) == Q.model_bytes(model)


def test_bench_gemv_all_configs_checks_every_candidate(monkeypatch, capsys):
    """bench.py gemv --all-configs: a row per candidate config of the bf16 and int8 ops, each output within
    bf16 rounding of dequantize + F.linear."""
    import json

    import bench

    monkeypatch.setattr(bench, "GEMV_SHAPES", {"o": (32, 256)})
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1.0)
    assert bench.main(["gemv", "--batch-sizes", "1", "--shapes", "o", "--min-mb", "0", "--all-configs", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    configs = [r for r in rows if r["bench"] == "gemv_config"]
    for op in ("bf16", "int8"):
        assert sorted(r["config"] for r in configs if r["op"] == op) == sorted(
            "/".join(map(str, c)) for c in gemv.candidates(op, 1, 256))
    assert all(r["max_rel_err"] < 1e-2 for r in configs)


@pytest.mark.parametrize("policy", ["residual", "all"])
def test_linear_at_several_rows_takes_the_fusions_only_where_its_kernels_have_them(policy, monkeypatch):
    # fuses_rows (the row buckets where the tuner picked bf16_cu) sends the residual (FLINT_GEMV_FUSE_ROWS=all:
    # the norm and RoPE too) of 2..8 rows into the op; without a GPU the op runs them as plain ops around its
    # kernel (under the interpreter a Triton one, in another order than F.linear: test_gemv's tolerance)
    monkeypatch.setenv("FLINT_GEMV_FUSE_ROWS", policy)
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 256, bias=False).to(torch.bfloat16)
    lin.__class__ = gemv.Linear
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    g = (1 + 0.5 * torch.randn(64, generator=gen)).to(torch.bfloat16)
    res = torch.randn(2, 3, 256, generator=gen).to(torch.bfloat16)
    angle = torch.randn(2, 3, 1, 16, generator=gen)
    cos, sin = torch.cat((angle.cos(),) * 2, -1).to(torch.bfloat16), torch.cat((angle.sin(),) * 2, -1).to(torch.bfloat16)
    want_norm = torch.nn.functional.linear(gemv.rms_norm(x, g, 1e-5), lin.weight) + res
    want_rope = gemv.rope_heads(torch.nn.functional.linear(gemv.rms_norm(x, g, 1e-5), lin.weight),
                                cos, sin, 4 * 32)

    def ok(got, want):
        err = (got.float() - want.float()).abs()
        assert (err <= 2 ** -7 * want.float().abs() + 2 ** -9 * want.float().abs().max()).all(), err.max()

    with torch.no_grad():
        for rows_fused in (False, True):
            lin.fuses_rows = frozenset({8} if rows_fused else ())
            assert gemv.fusable(x, (g, 1e-5), None, rows_fused) == rows_fused
            ok(lin(x, norm=(g, 1e-5), residual=res), want_norm)
            ok(lin(x, norm=(g, 1e-5), rope=(cos, sin, 4)), want_rope)
            ok(lin(x, residual=res), torch.nn.functional.linear(x, lin.weight) + res)
    # where the ops go: into the op (None) or around it
    inside = lambda **kw: gemv.ops_outside_kernel(lin, x, False, kw.get("norm"), kw.get("residual"), None,  # noqa: E731
                                                  True, True) is None
    assert inside(residual=res) and inside(norm=(g, 1e-5), residual=res)  # what the op is asked, it takes
    lin.fuses_rows = frozenset({8})
    with torch.no_grad():  # Linear.forward asks it for the norm only with "all"
        calls = []
        real = gemv.ops_outside_kernel
        monkeypatch.setattr(gemv, "ops_outside_kernel", lambda *a: calls.append(a[-1]) or real(*a))
        lin(x, norm=(g, 1e-5), residual=res)  # (plain ops around it call the linear again without them)
        assert calls[0] == (policy == "all")
        calls.clear()
        lin(x, residual=res)
        assert calls == [True]
    assert not gemv.fusable(torch.zeros(9, 64, dtype=torch.bfloat16), None, None, True)  # past the kernel's rows


def test_rows_fusions_follow_the_picks(monkeypatch):
    # tune_linears marks the row buckets where the picked kernel adds the residual itself (bf16_cu); a kernel
    # without it leaves the add outside the op (inductor fuses it there); FLINT_GEMV_FUSE_ROWS=0: never
    lin = torch.nn.Linear(64, 256, bias=False).to(torch.bfloat16)
    lin.__class__ = gemv.Linear
    model = torch.nn.Sequential(lin)
    key = lambda M: gemv._key("bf16", M, 256, 64, 0, torch.device("cpu"))  # noqa: E731
    monkeypatch.setattr(gemv, "_best", {key(8): ("bf16_cu", 1, 4, 8, 1), key(2): gemv.DEQUANT,
                                        key(4): ("fma", 8, 256, 4, 1)})
    gemv.set_rows_fusions(model, [1, 2, 4, 8, 16], torch.device("cpu"))
    assert lin.fuses_rows == {4, 8}  # fma has the add too; 1 and 16 are not this policy's
    monkeypatch.setitem(gemv._best, key(8), gemv._DOT[0])
    gemv.set_rows_fusions(model, [8], torch.device("cpu"))
    assert lin.fuses_rows == {4}
    monkeypatch.setenv("FLINT_GEMV_FUSE_ROWS", "0")
    gemv.set_rows_fusions(model, [2, 4, 8], torch.device("cpu"))
    assert lin.fuses_rows == set()
