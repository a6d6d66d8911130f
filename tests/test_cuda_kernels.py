"""cuda_kernels.py's int4 GEMV against the dequantized fp32 reference and against gemv.py's Triton int4_h2 kernel
(the same math in another order), every compiled (rows, unroll) instance, with each fusion (RMSNorm, residual,
SwiGLU, RoPE), in a CUDA graph: on a GPU with nvcc only. On any machine: when the kernel is offered (available,
supports, gemv's candidates), and that the source compiles where there is an nvcc. The tolerance is test_gemv's:
the output is rounded to bf16 after fp32 sums, each lane's 32 products summed in fp16
(|y - ref| <= 2^-7 |ref| + 2^-9 max|ref|).
"""
import shutil

import pytest
import torch

import cuda_kernels
import gemv
import quantize as Q

GPU = torch.cuda.is_available() and cuda_kernels.available("cuda")
gpu = pytest.mark.skipif(not GPU, reason=f"no CUDA GPU or no nvcc ({cuda_kernels.build_error()})")


def test_offered_only_on_a_gpu_and_not_when_turned_off(monkeypatch):
    assert not cuda_kernels.available("cpu")
    monkeypatch.setenv("FLINT_CUDA_KERNELS", "0")
    assert not cuda_kernels.available("cuda")


def test_supported_shapes():
    assert cuda_kernels.supports(6144, 4096, 128, rope_d=128) and cuda_kernels.supports(28672, 4096, 128, glu=True)
    assert cuda_kernels.supports(97, 640, 32) and cuda_kernels.supports(96, 576, 64)
    assert not cuda_kernels.supports(97, 640, 128, glu=True)  # glu pairs need an even N
    assert not cuda_kernels.supports(96, 640, 256)  # no instance for G = 256
    assert not cuda_kernels.supports(96, 600, 32)  # 16 bytes a lane


def test_gemv_offers_it_at_one_row_where_it_builds(monkeypatch):
    monkeypatch.setattr(gemv, "_cuda_kernels_for", lambda K, G: True)
    names = lambda M, K: [c for c in gemv.candidates("int4", M, K, 128) if c[0] == "int4_cu"]  # noqa: E731
    assert names(1, 4096) == gemv._CU_INT4 and names(1, 640) == [("int4_cu", 2, 1, 8, 1)]  # ragged K: (2, 1)
    assert names(2, 4096) == [] and [c for c in gemv.candidates("int8", 1, 4096) if c[0] == "int4_cu"] == []
    assert all((c[1], c[2]) in cuda_kernels.INSTANCES for c in gemv._CU_INT4)
    monkeypatch.setattr(gemv, "_cuda_kernels_for", lambda K, G: False)
    assert names(1, 4096) == []


@pytest.mark.skipif(shutil.which("nvcc") is None and cuda_kernels._nvcc() is None, reason="no nvcc")
def test_source_compiles_for_hopper():
    assert cuda_kernels._build("90").endswith(".so")


# (N, K, G): K a multiple of 1024 (every instance) with a step count that U does not divide (3, 14); K = 640 (the
# lanes past K); N = 28672 (more units than warps on the GPU: each warp takes several)
SHAPES = [(300, 3072, 128), (258, 2048, 64), (130, 1024, 32), (98, 640, 128), (4096, 14336, 128), (28672, 1024, 128)]
WARPS = (4, 8)


def problem(N, K, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, K, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g) + torch.randn(N, 1, generator=g)
    scales, zeros = Q.int4_grid(w, G)
    q = Q.int4_codes(w, scales, zeros)
    sz = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16)
    ref = x.float() @ Q.int4_dequantize(q, scales, zeros).t()
    return x.cuda(), Q.pack_nibbles(q).cuda(), sz.cuda(), ref


def close(y, ref):
    err = (y.float().cpu() - ref).abs()
    bound = 2 ** -7 * ref.abs() + 2 ** -9 * ref.abs().max()
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"


def configs(K):
    return [("int4_cu", r, u, w, 1) for r, u in cuda_kernels.INSTANCES for w in WARPS
            if K % 1024 == 0 or (r, u) == (2, 1)]


@gpu
@pytest.mark.parametrize("N,K,G", SHAPES)
def test_int4_gemv_every_instance(N, K, G):
    x, packed, sz, ref = problem(N, K, G)
    triton_y = gemv._run_int4(x, packed, sz, G, gemv._H2_INT4[0])
    close(triton_y, ref)
    for cfg in configs(K):
        y = gemv._run_int4(x, packed, sz, G, cfg)
        close(y, ref)
        assert torch.equal(gemv._run_int4(x, packed, sz, G, cfg), y), cfg  # deterministic


@gpu
@pytest.mark.parametrize("N,K,G", [(300, 3072, 128), (98, 640, 128), (28672, 1024, 128)])
def test_int4_gemv_fusions(N, K, G):
    # the norm (x of a few hundred, as a residual stream is), the residual, SwiGLU and RoPE against the
    # plain kernel's output with the ops applied after, as test_gemv checks the Triton kernels
    x, packed, sz, _ = problem(N, K, G)
    gen = torch.Generator().manual_seed(1)
    x = (x.float() * 300).to(torch.bfloat16)
    g = (1 + 0.5 * torch.randn(K, generator=gen)).to(torch.bfloat16).cuda()
    res = (10 * torch.randn(1, N, generator=gen)).to(torch.bfloat16).cuda()
    res_glu = (10 * torch.randn(1, N // 2, generator=gen)).to(torch.bfloat16).cuda()
    D = 2 if N == 98 else 4 if N == 300 else 128
    angle = torch.randn(1, D // 2, generator=gen) * 3
    cos = torch.cat((angle.cos(), angle.cos()), -1).to(torch.bfloat16).cuda()
    sin = torch.cat((angle.sin(), angle.sin()), -1).to(torch.bfloat16).cuda()
    rope_rows = (N // D) // 2 * D
    xn = gemv.rms_norm(x, g, 1e-5)

    def ok(got, want, what):
        err = (got.float() - want.float()).abs()
        assert (err <= 2 ** -7 * want.float().abs() + 2 ** -9 * want.float().abs().max()).all(), (what, err.max())

    for cfg in configs(K):
        plain = gemv._run_int4(xn, packed, sz, G, cfg)
        ok(gemv._run_int4(x, packed, sz, G, cfg, False, (g, 1e-5), res), plain.float() + res.float(), (cfg, "norm"))
        if cfg[1] >= 2:
            glu = gemv._run_int4(x, packed, sz, G, cfg, True, (g, 1e-5), res_glu)
            ok(glu, gemv.silu_mul(plain).float() + res_glu.float(), (cfg, "glu"))
            rope = gemv._run_int4(x, packed, sz, G, cfg, False, (g, 1e-5), None, (cos, sin, rope_rows))
            want = gemv.rope_heads(plain, cos[:, None], sin[:, None], rope_rows)
            ok(rope, want, (cfg, "rope"))
            assert torch.equal(rope[:, rope_rows:], plain[:, rope_rows:])  # v: as computed


@gpu
def test_int4_linear_picks_among_them():
    # the op's tuner times the int4_cu configs beside the Triton ones; whatever it picks, the op is right
    x, packed, sz, ref = problem(4096, 4096, 128)
    assert any(c[0] == "int4_cu" for c in gemv.candidates("int4", 1, 4096, 128))
    close(gemv.int4_linear(x, packed, sz, 128), ref)


@gpu
def test_int4_gemv_in_a_cuda_graph():
    x, packed, sz, ref = problem(1024, 2048, 64)
    cfg = ("int4_cu", 2, 2, 8, 1)
    y = gemv._run_int4(x, packed, sz, 64, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv._run_int4(x, packed, sz, 64, cfg)
    x.copy_(torch.zeros_like(x))
    graph.replay()
    assert out.abs().max() == 0
    x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).cuda())
    graph.replay()
    assert torch.equal(out, y)
    close(out, ref)
