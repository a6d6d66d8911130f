"""kv.decode_attention (the Triton split-K decode kernels a GPU's static cache uses) against SDPA, run
through Triton's interpreter on CPU; and a model's decode steps with and without it."""
import os

import pytest
import torch
import torch.nn.functional as F

import kv
from kv import StaticKVCache
from model import ModelArgs

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sdpa_reference(q, k, v, pos, window):
    B, H, _, D = q.shape
    S = k.shape[2]
    slots = torch.arange(S, device=q.device)
    seen = slots[None, :] <= pos[:, None]  # [B, S]
    if window:
        seen &= slots[None, :] > pos[:, None] - window
    mask = seen[:, None, None, :]  # [B, 1, 1, S]
    return F.scaled_dot_product_attention(q, k[:B], v[:B], attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("H,Hkv,D", [(4, 2, 16), (9, 3, 64), (8, 8, 32), (6, 1, 16)])
@pytest.mark.parametrize("window", [0, 50])
def test_matches_sdpa(H, Hkv, D, window):
    g = torch.Generator().manual_seed(H * 100 + D + window)
    B, S = 3, 160  # 160 slots: three pieces of 64, the last one partial
    k = torch.randn(B + 1, Hkv, S, D, generator=g)  # the cache may hold more rows than the step uses
    v = torch.randn(B + 1, Hkv, S, D, generator=g)
    # this step's q, k, v as the model hands them over: strided views into one qkv output [B, 1, H + 2Hkv, D]
    qkv = torch.randn(B, 1, H + 2 * Hkv, D, generator=g)
    q = qkv[:, :, :H].transpose(1, 2)
    k_new, v_new = qkv[:, :, H:H + Hkv].transpose(1, 2), qkv[:, :, H + Hkv:].transpose(1, 2)  # stored at pos
    for positions in ([0, 63, 64], [159, 100, 5], [127, 128, 30]):
        pos = torch.tensor([[p, -1] for p in positions])[:, 0]  # a strided view too
        k_dev, v_dev = k.clone().to(DEVICE), v.clone().to(DEVICE)
        qkv_dev, pos_dev = qkv.to(DEVICE), torch.tensor([[p, -1] for p in positions], device=DEVICE)[:, 0]
        q_dev = qkv_dev[:, :, :H].transpose(1, 2)
        k_new_dev, v_new_dev = qkv_dev[:, :, H:H + Hkv].transpose(1, 2), qkv_dev[:, :, H + Hkv:].transpose(1, 2)
        got = kv.decode_attention(q_dev, k_new_dev, v_new_dev, k_dev, v_dev, pos_dev, window)
        k_want, v_want = k.clone(), v.clone()
        rows = torch.arange(B)
        k_want[rows, :, pos] = k_new[:, :, 0]
        v_want[rows, :, pos] = v_new[:, :, 0]
        want = sdpa_reference(q, k_want, v_want, pos, window)
        assert got.shape == (B, H, 1, D)
        assert (got.cpu().float() - want).abs().max() < 1e-4, positions
        assert torch.equal(k_dev.cpu(), k_want) and torch.equal(v_dev.cpu(), v_want)  # stored, nothing else touched


def test_model_decode_steps_with_the_kernel_equal_masks(monkeypatch, tiny_model):
    # the same decode steps over a static cache: SDPA with masks (the CPU path) and the kernel
    args = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256,
                     sliding_window=12)
    model = tiny_model(args, 3)
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    model = model.to(DEVICE)
    tokens = tokens.to(DEVICE)
    outs = []
    for use_kernel in (False, True):
        if use_kernel:
            monkeypatch.delenv("FLINT_DECODE_ATTENTION", raising=False)
            monkeypatch.setattr(kv, "DECODE_KERNEL_ON_CPU", True)
        else:
            monkeypatch.setenv("FLINT_DECODE_ATTENTION", "0")
        cache = StaticKVCache(args, 2, 96, device=DEVICE)
        with torch.no_grad():
            steps = [model(tokens[:, :9], None, cache)]
            for t in range(9, 20):  # rows at different positions: row 1 runs 3 slots ahead
                pos = torch.tensor([[t], [t + 3]], device=DEVICE)
                steps.append(model(tokens[:, t:t + 1], pos, cache))
        outs.append(steps)
    assert kv.decode_kernel_available(torch.zeros(1, device=DEVICE)) is True  # the second pass did use it
    for a, b in zip(*outs):
        assert (a - b).abs().max() < 1e-4
