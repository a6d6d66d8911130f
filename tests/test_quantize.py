"""quantize.py: quantization error bounds, packed kernels, checkpoints, GPTQ/AWQ, GGUF blocks, bad options."""
import copy

import pytest
import torch
import torch.nn as nn

import cpu_kernels
import quantize as Q
from model import ModelArgs, Transformer


def bf16_matmul(x, w):
    """What ATen's and gemv's kernels compute: bf16 activations, fp32 accumulation."""
    return x.to(torch.bfloat16).float() @ w.t()


def kernel_matmul(m, x, w):
    """What m's kernel computes with x: cpu_kernels' ops round x to int8 per block of 32, the others to bf16."""
    if getattr(m, "layout", None) == "cpu_q4" or getattr(m, "cpu_q8", False):
        return cpu_kernels.round_activations(x) @ w.t()
    return bf16_matmul(x, w)


@pytest.fixture(params=["cpu_kernels", "aten"])
def cpu_path(request, monkeypatch):
    """Modules built under it take cpu_kernels.py's ops (where the machine has them) or ATen's kernels."""
    if request.param == "aten":
        monkeypatch.setenv("FLINT_CPU_KERNELS", "0")
    elif not cpu_kernels.available():
        pytest.skip(f"cpu_kernels unavailable here: {cpu_kernels.build_error()}")
    return request.param


def tiny_model(tie=True, seed=0) -> Transformer:
    args = ModelArgs(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, norm_eps=1e-5,
                     max_seq_len=128, tie_embeddings=tie)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- quantize / dequantize


def test_int8_error_bound():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * torch.rand(96, 1) * 3
    q, scales = Q.int8_quantize(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (w - q.float() * scales.float()[:, None]).abs()
    assert (err <= scales.float()[:, None] * 0.5 + 1e-6).all()
    assert (scales.float() - w.abs().amax(1) / 127).abs().max() <= scales.float().max() * 2 ** -8


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_bound(group_size):
    torch.manual_seed(0)
    w = torch.randn(64, 256) + torch.randn(64, 1)  # offset rows: asymmetric grids matter
    scales, zeros = Q.int4_grid(w, group_size)
    q = Q.int4_codes(w, scales, zeros)
    assert q.min() >= 0 and q.max() <= 15
    assert torch.equal(scales, scales.to(torch.bfloat16).float())  # exactly what the kernels will read
    err = (w - Q.int4_dequantize(q, scales, zeros)).abs().reshape(64, -1, group_size)
    # half a step, plus the bf16 rounding of zero (and of scale, times up to 8 steps)
    bound = 0.5 * scales + 2 ** -8 * (zeros.abs() + 8 * scales) + 1e-6
    assert (err <= bound[..., None]).all()
    assert err.mean() < 0.3 * scales.mean()


def test_nibble_packing_round_trip():
    q = torch.randint(0, 16, (32, 64), dtype=torch.int32)
    packed = Q.pack_nibbles(q)
    assert packed.shape == (32, 32) and packed.dtype == torch.uint8
    assert torch.equal(Q.unpack_nibbles(packed), q)


# ---------------------------------------------------------------- packed kernels


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_matches_dequantized_matmul(group_size, cpu_path):
    torch.manual_seed(0)
    lin = nn.Linear(192, 96, bias=True)  # 192 is not a multiple of 128: that case is zero-padded
    m = Q.Int4Linear.from_float(lin, group_size)
    x = torch.randn(3, 5, 192)
    w = m.dequantize()
    assert w.shape == (96, 192)
    ref = kernel_matmul(m, x, w) + lin.bias
    y = m(x)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=1e-2)  # the kernel rounds its output to bf16
    # the codes read back through the kernel are the ones we packed
    wp = Q._pad_columns(lin.weight.float(), group_size)
    scales, zeros = Q.int4_grid(wp, group_size)
    assert torch.equal(m.codes(), Q.int4_codes(wp, scales, zeros))


def test_int8_linear_matches_dequantized_matmul(cpu_path):
    torch.manual_seed(0)
    lin = nn.Linear(128, 80, bias=False)
    m = Q.Int8Linear.from_float(lin)
    x = torch.randn(7, 128)
    torch.testing.assert_close(m(x), kernel_matmul(m, x, m.dequantize()), atol=2e-2, rtol=1e-2)
    assert (m.dequantize() - lin.weight).abs().max() <= m.scales.float().max() * 0.51


# ---------------------------------------------------------------- model quantization and checkpoints


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32), ("int4-gptq", 64), ("int4-awq", 32)])
def test_checkpoint_round_trip_identical_logits(tmp_path, mode, group_size, cpu_path):
    model = tiny_model()
    tokens = torch.randint(0, 256, (1, 12))
    ref = model(tokens)
    calib = torch.randint(0, 256, (4, 32))
    Q.quantize_model(model, mode, group_size, calib)
    names = {type(m).__name__ for m in model.modules()}
    assert ("Int8Linear" in names) and (("Int4Linear" in names) == (mode != "int8"))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    out = model(tokens)
    assert torch.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.95  # quantized, but the same model
    Q.save_quantized(model, str(tmp_path))
    loaded, args = Q.load_quantized(str(tmp_path), "cpu")
    assert args == model.args
    assert torch.equal(loaded(tokens), out)
    assert Q.model_bytes(loaded) == Q.model_bytes(model)


def test_untied_head_none_keeps_float_head(tmp_path):
    model = tiny_model(tie=False)
    Q.quantize_model(model, "int4", 32, head="none")
    assert isinstance(model.lm_head, nn.Linear)
    tokens = torch.randint(0, 256, (2, 9))
    Q.save_quantized(model, str(tmp_path))
    loaded, _ = Q.load_quantized(str(tmp_path))
    assert torch.equal(loaded(tokens), model(tokens))


def test_engine_load_quantizes_the_head_as_asked(smollm2_path):
    from scheduler import Engine

    eng = Engine.load(smollm2_path, device="cpu", dtype="float32", progress=False, quant="int4", group_size=64,
                      quant_head="int4")  # --quant-head int4: every linear int4, as gpt-fast quantizes
    assert isinstance(eng.model.lm_head, Q.Int4Linear) and eng.model.lm_head.group_size == 64
    assert isinstance(eng.model.layers[0].mlp.down_proj, Q.Int4Linear)
    with pytest.raises(ValueError, match="--quant-head goes with --quant int8 or int4"):  # before loading anything
        Engine.load(smollm2_path, device="cpu", progress=False, quant_head="int4")


def test_engine_runs_quantized_model(engine):
    from sampling import SamplingParams
    from scheduler import Engine

    model = Q.quantize_model(copy.deepcopy(engine.model), "int4", 64)
    eng = Engine(model, engine.tokenizer, engine.device, engine.dtype)
    [out] = eng.generate(["The capital of France is"], SamplingParams(max_new_tokens=8, temperature=0.0))
    assert len(out.token_ids) > 0


# ---------------------------------------------------------------- GPTQ and AWQ


def correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return (torch.randn(n, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)  # low-rank: strong correlation
            + 0.3 * torch.randn(n, k, generator=g)) @ mix


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest(act_order):
    torch.manual_seed(0)
    N, K, G = 64, 256, 64
    W = torch.randn(N, K)
    X = correlated_inputs(2048, K)
    H = X.t() @ X * (2 / X.shape[0])
    q, scales, zeros = Q.gptq_quantize(W, H, G, act_order=act_order)
    assert q.min() >= 0 and q.max() <= 15
    err_gptq = (X @ (W - Q.int4_dequantize(q, scales, zeros)).t()).pow(2).mean()
    err_rtn = (X @ (W - Q.int4_fake_quantize(W, G)).t()).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)


def test_awq_beats_round_to_nearest_with_outlier_channels():
    torch.manual_seed(0)
    N, K, G = 96, 256, 64
    W = torch.randn(N, K)
    X = torch.randn(2048, K)
    X[:, torch.randperm(K)[:8]] *= 30  # a few salient input channels, as in real activations
    s, alpha = Q.awq_search(X, W, G)
    assert alpha > 0
    err_awq = (X @ (W - Q.int4_fake_quantize(W * s, G) / s).t()).pow(2).mean()
    err_rtn = (X @ (W - Q.int4_fake_quantize(W, G)).t()).pow(2).mean()
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


def test_awq_folding_is_exact_before_rounding():
    """The scales AWQ folds into RMSNorm / v_proj / up_proj leave the float model's output unchanged."""
    model = tiny_model()
    tokens = torch.randint(0, 256, (2, 16))
    ref = model(tokens)
    X = torch.randint(0, 256, (2, 32))
    Q._awq_model(model, X, 32, progress=False)  # scales only, no rounding yet
    torch.testing.assert_close(model(tokens), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- GGUF blocks


def test_gguf_q4_1_blocks_load_directly(smollm2_path):
    import weights

    _, tensors = weights.read_gguf(smollm2_path)
    t = tensors["blk.0.ffn_down.weight"]
    assert t.type_name == "Q4_1"
    blocks = weights.gguf_raw_blocks(t)
    ref_w = weights.dequantize(blocks, t.ggml_type)  # [576, 1536] fp32
    m = Q.gguf_linear(blocks.contiguous(), "Q4_1")
    assert isinstance(m, Q.Int4Linear) and m.group_size == 32
    # the codes are llama.cpp's own; only d and m + 8d were rounded (fp16 -> bf16)
    qs = blocks[..., 4:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(576, -1).to(torch.int32)
    assert torch.equal(m.codes(), codes)
    err = (m.dequantize() - ref_w).abs().max()
    assert err <= 2 ** -7 * ref_w.abs().max()
    x = torch.randn(4, 1536)
    y = m(x)
    torch.testing.assert_close(y, kernel_matmul(m, x, m.dequantize()), atol=3e-2, rtol=2e-2)
    ref = x @ ref_w.t()
    assert (y - ref).norm() < 0.01 * ref.norm()


def test_gguf_q4_0_blocks_load_directly():
    torch.manual_seed(0)
    N, nb = 32, 4
    d = (torch.rand(N, nb) * 0.01 + 1e-3).to(torch.float16)
    qs = torch.randint(0, 256, (N, nb, 16), dtype=torch.uint8)
    blocks = torch.cat([d.view(torch.uint8).reshape(N, nb, 2), qs], dim=-1)  # [N, nb, 18]
    import weights

    ref_w = weights.dequantize(blocks, 2)  # ggml type 2: Q4_0
    m = Q.gguf_linear(blocks, "Q4_0")
    assert (m.dequantize() - ref_w).abs().max() <= 2 ** -7 * ref_w.abs().max()
    x = torch.randn(3, nb * 32)
    torch.testing.assert_close(m(x), kernel_matmul(m, x, ref_w), atol=2e-2, rtol=2e-2)


def test_gguf_q8_0_requantized_per_row(smollm2_path):
    import weights

    _, tensors = weights.read_gguf(smollm2_path)
    t = tensors["token_embd.weight"]
    assert t.type_name == "Q8_0"
    blocks = weights.gguf_raw_blocks(t)[:512].contiguous()
    ref_w = weights.dequantize(blocks, t.ggml_type)
    m = Q.gguf_linear(blocks, "Q8_0")
    assert isinstance(m, Q.Int8Linear)
    # per-row int8 over per-32 int8: the extra rounding is at most half a row step
    err = (m.dequantize() - ref_w).abs()
    assert (err <= m.scales.float()[:, None] * 0.51).all()
    rel = (err.pow(2).mean() / ref_w.pow(2).mean()).sqrt()
    assert rel < 0.02, rel
    x = torch.randn(3, 576)
    torch.testing.assert_close(m(x), kernel_matmul(m, x, m.dequantize()), atol=3e-2, rtol=2e-2)


def test_quantized_from_gguf_matches_float_model(engine, smollm2_path):
    model, args, info = Q.quantized_from_gguf(smollm2_path)
    assert isinstance(model.layers[0].mlp.down_proj, Q.Int4Linear)
    assert isinstance(model.lm_head, Q.Int8Linear)
    tokens = torch.tensor([engine.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.inference_mode():
        ref, out = engine.model(tokens), model(tokens)
    # same weights up to bf16 activations/scales and the lm_head's per-row requantization
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


# ---------------------------------------------------------------- bad options


def test_bad_options():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        Q.quantize_model(model, "int3")
    with pytest.raises(ValueError, match="group size 48 is not supported"):
        Q.quantize_model(model, "int4", 48)
    with pytest.raises(ValueError, match="needs calibration"):
        Q.quantize_model(model, "int4-gptq", 32)
    with pytest.raises(ValueError, match="unknown head"):
        Q.quantize_model(model, "int4", 32, head="int2")
    wide = tiny_model()
    wide.layers[0].mlp.down_proj = nn.Linear(96, 64, bias=False)  # 96 is not a multiple of 64
    with pytest.raises(ValueError, match=r"group size 64 does not divide in_features 96 of 'layers.0.mlp.down_proj'"):
        Q.quantize_model(wide, "int4", 64)
    assert isinstance(wide.layers[0].mlp.down_proj, nn.Linear)  # nothing was touched
    Q.quantize_model(wide, "int4", 64, pad=True)  # unless asked to pad
    assert wide.layers[0].mlp.down_proj.k_padded == 128


def test_cli_errors_are_one_line(tmp_path, capsys):
    for argv, msg in [(["--mode", "int5", "--out", str(tmp_path)], "unknown quantization mode 'int5'"),
                      (["--mode", "int4", "--group-size", "100", "--out", str(tmp_path)], "group size 100"),
                      (["--mode", "int8", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)], "does not exist")]:
        with pytest.raises(SystemExit) as e:
            Q.main(argv)
        text = str(e.value.code)
        assert text.startswith("quantize.py: error:") and msg in text and "\n" not in text


def test_load_quantized_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Q.load_quantized(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="no flint quantization_config"):
        Q.load_quantized(str(tmp_path))
