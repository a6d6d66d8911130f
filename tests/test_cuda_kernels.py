"""cuda_kernels.py's bf16 tensor-core GEMV (1..8 rows) against fp32 and with its fusions against the plain ops;
its int4 GEMV against the dequantized fp32 reference and against gemv.py's Triton int4_h2 kernel
(the same math in another order), every compiled (rows, unroll) instance, with each fusion (RMSNorm, residual,
SwiGLU, RoPE), in a CUDA graph: on a GPU with nvcc only. On any machine: when the kernel is offered (available,
supports, gemv's candidates), and that the source compiles where there is an nvcc. The tolerance is test_gemv's:
the output is rounded to bf16 after fp32 sums, each lane's 32 products summed in fp16
(|y - ref| <= 2^-7 |ref| + 2^-9 max|ref|). Its decode attention (sm_90) against fp32 SDPA at every cluster size, through
kv.decode_attention against the Triton kernels, and in a CUDA graph.
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
    assert not cuda_kernels.available("cpu") and not cuda_kernels.buildable("cpu")
    monkeypatch.setenv("FLINT_CUDA_KERNELS", "0")
    assert not cuda_kernels.available("cuda") and not cuda_kernels.buildable("cuda")


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


def test_the_build_runs_once_in_the_background_and_keeps_its_failure(monkeypatch):
    import threading
    calls, release = [], threading.Event()

    def fake_build(arch):
        calls.append(arch)
        release.wait(10)
        if arch == "bad":
            raise RuntimeError("nvcc failed: no")
        return f"/tmp/{arch}.so"

    monkeypatch.setattr(cuda_kernels, "_build", fake_build)
    monkeypatch.setattr(cuda_kernels, "_builds", {})
    first = cuda_kernels._build_in_background("ok")  # returns at once, the build still running
    assert not first.done() and cuda_kernels._build_in_background("ok") is first
    release.set()
    assert first.result(10) == "/tmp/ok.so" and calls == ["ok"]
    with pytest.raises(RuntimeError, match="nvcc failed"):
        cuda_kernels._build_in_background("bad").result(10)
    cuda_kernels.wait_for_builds()  # returns (both done), the failure kept for available()
    cuda_kernels.prebuild("cpu")  # nothing to build for a CPU
    assert sorted(cuda_kernels._builds) == ["bad", "ok"] and calls == ["ok", "bad"]


def test_the_engine_starts_the_build_before_loading(monkeypatch):
    import scheduler
    asked = []
    monkeypatch.setattr(cuda_kernels, "prebuild", lambda device: asked.append(str(device)))
    monkeypatch.setattr(scheduler, "load_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        scheduler.Engine.load("x", device="cpu", compile=True)
    assert asked == ["cpu"]


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


def fusion_operands(x, N, D):
    """x [M, K] scaled to a few hundred (as a residual stream is), RMSNorm(x) with weight g, residuals for N and
    N / 2 (glu) outputs, RoPE's cos and sin [M, D] and the rows it rotates: the fusions' inputs, on the GPU."""
    M, K = x.shape
    gen = torch.Generator().manual_seed(1)
    x = (x.float() * 300).to(torch.bfloat16)
    g = (1 + 0.5 * torch.randn(K, generator=gen)).to(torch.bfloat16).cuda()
    res = (10 * torch.randn(M, N, generator=gen)).to(torch.bfloat16).cuda()
    res_glu = (10 * torch.randn(M, N // 2, generator=gen)).to(torch.bfloat16).cuda()
    angle = torch.randn(M, D // 2, generator=gen) * 3
    cos = torch.cat((angle.cos(), angle.cos()), -1).to(torch.bfloat16).cuda()
    sin = torch.cat((angle.sin(), angle.sin()), -1).to(torch.bfloat16).cuda()
    return x, gemv.rms_norm(x, g, 1e-5), g, res, res_glu, cos, sin, (N // D) // 2 * D


def ok(got, want, what):
    err = (got.float() - want.float()).abs()
    assert (err <= 2 ** -7 * want.float().abs() + 2 ** -9 * want.float().abs().max()).all(), (what, err.max())


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
    x, xn, g, res, res_glu, cos, sin, rope_rows = fusion_operands(x, N, 2 if N == 98 else 4 if N == 300 else 128)
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


# ---------------------------------------------------------------- bf16 GEMV at 1..8 rows (tensor cores)

def test_bf16_mma_offered_at_2_to_8_rows_where_it_builds(monkeypatch):
    assert cuda_kernels.mma_supports(8, 6144, 4096, rope_d=128) and cuda_kernels.mma_supports(1, 97, 640)
    assert not cuda_kernels.mma_supports(9, 4096, 4096) and not cuda_kernels.mma_supports(8, 4096, 4100)
    assert not cuda_kernels.mma_supports(8, 97, 640, glu=True) and not cuda_kernels.mma_supports(8, 96, 64, rope_d=16)
    monkeypatch.setattr(gemv, "_cuda_bf16_for", lambda K: True)
    names = lambda M, glu=False: [c for c in gemv.candidates("bf16", M, 4096, 0, glu) if c[0] == "bf16_cu"]  # noqa: E731
    assert names(1) == [] and names(2) == names(8) == gemv._CU_BF16 and names(9) == []
    assert names(8, glu=True) == [c for c in gemv._CU_BF16 if c[1] % 2 == 0]  # the GLU epilogue pairs tiles
    assert len([c for c in gemv.candidates("bf16", 8, 4096, 0, True) if c[0] == "bf16_cu+silu"]) == len(gemv._CU_BF16)
    assert all((c[1], c[2]) in cuda_kernels.MMA_INSTANCES and c[3] <= cuda_kernels.MMA_MAX_WARPS for c in gemv._CU_BF16)
    assert [c for c in gemv.candidates("int8", 8, 4096) if c[0] == "bf16_cu"] == []
    monkeypatch.setattr(gemv, "_cuda_bf16_for", lambda K: False)
    assert names(8) == []


MMA_SHAPES = [(6144, 4096), (4096, 14336), (300, 1024), (97, 640), (2048, 96)]  # ragged N, K not a step's multiple


def mma_problem(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(torch.bfloat16)
    return x.cuda(), w.cuda(), x.float() @ w.float().t()


def mma_configs():
    return [("bf16_cu", t, u, w, 1) for t, u in cuda_kernels.MMA_INSTANCES for w in (1, 4, 8)]


@gpu
@pytest.mark.parametrize("N,K", MMA_SHAPES)
def test_bf16_mma_every_instance(N, K):
    for M in (1, 2, 5, 8):
        x, w, ref = mma_problem(M, N, K)
        for cfg in mma_configs():
            y = gemv._run_dense(x, w, None, cfg)
            assert y.shape == (M, N)
            close(y, ref)
            assert torch.equal(gemv._run_dense(x, w, None, cfg), y), cfg  # deterministic
    x, w, ref = mma_problem(8, N, K)  # rows of x strided (a view of a wider tensor)
    wide = torch.zeros(8, K + 64, dtype=torch.bfloat16, device="cuda")
    wide[:, :K] = x
    close(gemv._run_dense(wide[:, :K], w, None, ("bf16_cu", 2, 2, 8, 1)), ref)


@gpu
@pytest.mark.parametrize("M,N,K", [(8, 1024, 4096), (3, 512, 640), (8, 96 * 4, 96), (5, 400, 640)])
def test_bf16_mma_fusions(M, N, K):
    # against the plain kernel with the ops after it, as test_gemv checks the Triton kernels; N = 400: 200 gate
    # rows, not a whole number of tiles (and a head dim of 80, which RoPE's tiles cannot take: the plain ops)
    x, w, _ = mma_problem(M, N, K)
    x, xn, g, res, res_glu, cos, sin, rope_rows = fusion_operands(x, N, {384: 64, 400: 80}.get(N, 128))
    for cfg in mma_configs():
        plain = gemv._run_dense(xn, w, None, cfg)
        ok(gemv._run_dense(x, w, None, cfg, False, (g, 1e-5), res), plain.float() + res.float(), (cfg, "norm"))
        ok(gemv._run_dense(x, w, None, cfg, True, (g, 1e-5), res_glu), gemv.silu_mul(plain).float() + res_glu.float(),
           (cfg, "glu"))
        rope = gemv._run_dense(x, w, None, cfg, False, (g, 1e-5), None, (cos, sin, rope_rows))
        ok(rope, gemv.rope_heads(plain, cos[:, None], sin[:, None], rope_rows), (cfg, "rope"))
        assert torch.equal(rope[:, rope_rows:], plain[:, rope_rows:])  # v: as computed


@gpu
def test_bf16_mma_in_a_cuda_graph_and_through_the_op():
    x, w, ref = mma_problem(8, 1024, 2048)
    cfg = ("bf16_cu", 2, 2, 8, 1)
    y = gemv._run_dense(x, w, None, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv._run_dense(x, w, None, cfg)
    x.copy_(torch.zeros_like(x))
    graph.replay()
    assert out.abs().max() == 0
    x.copy_(mma_problem(8, 1024, 2048)[0])
    graph.replay()
    assert torch.equal(out, y)
    close(gemv.bf16_linear(x, w), ref)  # whatever the tuner picks


# ---------------------------------------------------------------- decode attention (sm_90)

def split_qkv(qkv, H, Hkv):
    # [B, 1, H + 2 Hkv, D] -> q [B, H, 1, D], k, v [B, Hkv, 1, D]: strided views, as the model passes them
    return (qkv[:, :, :H].transpose(1, 2), qkv[:, :, H:H + Hkv].transpose(1, 2),
            qkv[:, :, H + Hkv:].transpose(1, 2))


def test_attention_where_a_cache_asks_for_it_and_the_shapes_it_takes(monkeypatch):
    import kv
    from model import ModelArgs

    monkeypatch.delenv("FLINT_CUDA_ATTENTION", raising=False)
    assert kv.use_cuda_attention(True) and not kv.use_cuda_attention(False)
    assert not cuda_kernels.attention_available("cpu")
    for flag, want in (("1", True), ("0", False)):  # the environment overrides what the cache asks
        monkeypatch.setenv("FLINT_CUDA_ATTENTION", flag)
        assert kv.use_cuda_attention(True) == want and kv.use_cuda_attention(False) == want
    monkeypatch.delenv("FLINT_CUDA_ATTENTION")
    # a decode step's meta names the kernel (here as if the cache were on a GPU)
    monkeypatch.setattr(kv, "decode_kernel_available", lambda t: True)
    args = ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    pos = torch.tensor([[5]])
    assert kv.StaticKVCache(args, 1, 32, cuda_attention=True).prepare(pos)[0] == "cuda_kernel"
    assert kv.StaticKVCache(args, 1, 32).prepare(pos)[0] == "kernel"

    def supports(H, Hkv, D, dtype=torch.bfloat16, pos_dtype=torch.int64):
        q, k, v = split_qkv(torch.zeros(2, 1, H + 2 * Hkv, D, dtype=dtype), H, Hkv)
        cache = torch.zeros(2, Hkv, 64, D, dtype=dtype)
        return cuda_kernels.attention_supports(q, k, v, cache, cache, torch.zeros(2, dtype=pos_dtype))

    assert supports(32, 8, 128) and supports(9, 3, 64) and supports(16, 2, 64, pos_dtype=torch.int32)
    assert not supports(32, 8, 128, dtype=torch.float32) and not supports(8, 8, 96) and not supports(32, 2, 128)


def test_the_engine_asks_for_it_for_int4_models_at_batch_1():
    from model import ModelArgs, Transformer
    from quantize import quantize_model
    from scheduler import Engine

    args = ModelArgs(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    torch.manual_seed(0)
    for mode, want in ((None, False), ("int8", False), ("int4", True)):
        model = Transformer(args)
        if mode:
            quantize_model(model, mode, 32 if mode == "int4" else None)
        engine = Engine(model, None, "cpu", torch.float32)
        assert engine._cache_for(1, 16).cuda_attention == want and not engine._cache_for(8, 16).cuda_attention


ATTN_GPU = GPU and cuda_kernels.attention_available("cuda")
attn_gpu = pytest.mark.skipif(not ATTN_GPU, reason="no GPU of compute capability 9.0 with nvcc")


def attention_problem(B, H, Hkv, D, S, seed):
    g = torch.Generator().manual_seed(seed)
    bf16 = dict(dtype=torch.bfloat16)
    k_cache = torch.randn(B + 1, Hkv, S, D, generator=g).to(**bf16)  # the cache may hold more rows than the step
    v_cache = torch.randn(B + 1, Hkv, S, D, generator=g).to(**bf16)
    qkv = (torch.randn(B, 1, H + 2 * Hkv, D, generator=g) * 2).to(**bf16)
    return (k_cache.cuda(), v_cache.cuda(), *split_qkv(qkv.cuda(), H, Hkv))


def attention_reference(q, k_new, v_new, k_cache, v_cache, pos, window):
    # fp32 SDPA over the cache with the step's key and value stored at pos
    B, H, _, D = q.shape
    k, v = k_cache[:B].float().clone(), v_cache[:B].float().clone()
    rows = torch.arange(B, device=q.device)
    k[rows, :, pos] = k_new[:, :, 0].float()
    v[rows, :, pos] = v_new[:, :, 0].float()
    slots = torch.arange(k.shape[2], device=q.device)
    seen = slots[None, :] <= pos[:, None]
    if window:
        seen &= slots[None, :] > pos[:, None] - window
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=seen[:, None, None, :],
                                                            enable_gqa=True)


def attention_bound(want):
    return 2 ** -8 * want.abs() + 1e-3  # fp32 math, the output rounded to bf16 (2^-9 relative)


@attn_gpu
@pytest.mark.parametrize("H,Hkv,D", [(32, 8, 128), (9, 3, 64), (8, 8, 128), (56, 8, 128), (16, 2, 64)])
@pytest.mark.parametrize("window", [0, 50])
def test_decode_attention_matches_sdpa(H, Hkv, D, window):
    # every cluster size: one block a (row, kv head) walks all slots; 16 split them finely
    B, S = 3, 1000
    k_cache, v_cache, q, k_new, v_new = attention_problem(B, H, Hkv, D, S, H * 7 + D + window)
    for positions in ([0, 383, 999], [64, 5, 700], [128, 129, 1]):
        pos = torch.tensor([[p, -1] for p in positions], device="cuda")[:, 0]  # int64, strided
        want = attention_reference(q, k_new, v_new, k_cache, v_cache, pos, window)
        for cluster in (1, 2, 4, 8, 16):
            kc, vc = k_cache.clone(), v_cache.clone()
            out = torch.empty(B, H, 1, D, dtype=torch.bfloat16, device="cuda")
            assert cuda_kernels.attention_supports(q, k_new, v_new, kc, vc, pos)
            cuda_kernels.decode_attention(q, k_new, v_new, kc, vc, pos, window, out, pdl=True, cluster=cluster)
            excess = ((out.float() - want).abs() - attention_bound(want)).max().item()
            assert excess <= 0, (positions, cluster, excess)
            rows = torch.arange(B, device="cuda")
            k_want, v_want = k_cache.clone(), v_cache.clone()
            k_want[rows, :, pos] = k_new[:, :, 0]
            v_want[rows, :, pos] = v_new[:, :, 0]
            assert torch.equal(kc, k_want) and torch.equal(vc, v_want)  # stored, nothing else touched


@attn_gpu
def test_kv_decode_attention_uses_it_and_agrees_with_the_triton_kernels():
    import kv

    B, H, Hkv, D, S = 2, 32, 8, 128, 385
    k_cache, v_cache, q, k_new, v_new = attention_problem(B, H, Hkv, D, S, 5)
    pos = torch.tensor([200, 384], device="cuda", dtype=torch.int32)
    outs = []
    for cuda in (True, False):
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append((kv.decode_attention(q, k_new, v_new, kc, vc, pos, 0, cuda), kc, vc))
    (a, ka, va), (b, kb, vb) = outs
    # the Triton kernels' products are TF32 and their probabilities bf16: a looser bound
    assert (a.float() - b.float()).abs().max() < 3e-2 and torch.equal(ka, kb) and torch.equal(va, vb)


@attn_gpu
def test_decode_attention_in_a_cuda_graph():
    B, H, Hkv, D, S = 1, 32, 8, 128, 385
    k_cache, v_cache, q, k_new, v_new = attention_problem(B, H, Hkv, D, S, 6)
    pos = torch.tensor([10], device="cuda")
    out = torch.empty(B, H, 1, D, dtype=torch.bfloat16, device="cuda")
    kc, vc = k_cache.clone(), v_cache.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_kernels.decode_attention(q, k_new, v_new, kc, vc, pos, 0, out, pdl=True)
    for p in (10, 300, 384):  # the position moves between replays, as decode steps move it
        pos.fill_(p)
        kc.copy_(k_cache)
        vc.copy_(v_cache)
        graph.replay()
        want = attention_reference(q, k_new, v_new, k_cache, v_cache, pos, 0)
        assert ((out.float() - want).abs() - attention_bound(want)).max() <= 0, p
