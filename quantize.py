"""Weight-only quantization: int8 per channel, int4 per group (round-to-nearest, GPTQ, AWQ), GGUF Q4/Q8 loading.

    python quantize.py --model M --mode int8|int4|int4-gptq|int4-awq [--group-size 32|64|128] --out DIR

    model = quantize_model(model, "int4-gptq", group_size=64, calibration=tokens)   # in place, returns model
    save_quantized(model, "out/", {...}); model, args = load_quantized("out/", device)
    model, args, info = quantized_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")    # Q4_0/Q4_1/Q8_0 kept packed
    rows = quality_table()                                                        # perplexity per variant

Layouts and kernels:
  Int8Linear  weight int8 [N, K], scales [N]: w = q * scale (symmetric, per output channel).
              CPU: torch.ops.flint.cpu_q8_linear (cpu_kernels.py: AVX2, activations rounded to int8 per block of
              32; K % 32 == 0), else
              aten._weight_int8pack_mm. CUDA: gemv.int8_linear (Triton kernels reading the int8 weight
              once for up to 64 rows, F.linear on a bf16 copy for more), or without Triton
              F.linear(x, w.to(x.dtype)) * scale.
  Int4Linear  codes q in 0..15, per group of G input columns a scale and a zero: w = (q - 8) * scale + zero
              (asymmetric; zero = min + 8 * scale). Four layouts (self.layout), chosen by device:
              "gemv" (CUDA with Triton): weight = pack_nibbles(q) [N, K/2], scales_and_zeros [N, K/G, 2],
                read by gemv.int4_linear;
              "cpu_q4" (CPU with AVX2, see cpu_kernels.py; N % 8 == 0): weight = cpu_kernels.pack_q4(q)
                [N/8, K/32, 128], scales_and_zeros [N/8, K/G, 2, 8], read by torch.ops.flint.cpu_q4_linear (~4x ATen's
                kernel at one row on a 2-core AVX2 machine);
              "tinygemm" (CUDA without Triton, or FLINT_GEMV_INT4=0) and "cpu" (other CPUs, FLINT_CPU_KERNELS=0):
                weight packed by aten._convert_weight_to_int4pack(_for_cpu) for aten._weight_int4pack_mm(_for_cpu),
                scales_and_zeros [K/G, N, 2].
FLINT_GEMV=0 in the environment turns gemv off (the layouts and kernels used before it).
ATen's and gemv's kernels run with bf16 activations (and bf16 scales): on CPU ATen's fp32 paths are 4-10x
slower, on CUDA tinygemm only takes bf16; cpu_kernels's round fp32 activations to int8 per block of 32 (as
llama.cpp does). The output is cast back to the input's dtype, so an fp32 model stays fp32 elsewhere.
The int4 packing is device-specific, so checkpoints store a portable layout (codes two per byte, low nibble
first; scales_and_zeros [K/G, N, 2]) and the loader packs for its device. lm_head (tied or not) is int8 in
every mode unless head= says otherwise: it is the biggest matrix of a small model and the one most sensitive
to rounding.
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu_kernels
import gemv
from model import ModelArgs, Transformer, rope_cos_sin, rope_inv_freq

MODES = ("int8", "int4", "int4-gptq", "int4-awq")
GROUP_SIZES = (32, 64, 128)
HEAD_MODES = ("int8", "int4", "none")
SCALE_DTYPE = torch.bfloat16  # what both kernels want for activations, scales and zeros
DEFAULT_GROUP_SIZE = 64  # divides the dims of every Llama-family model we know, SmolLM2's 576 included
GPTQ_DAMP = 0.01  # fraction of mean(diag(H)) added to H's diagonal
GPTQ_BLOCK = 128  # columns per lazy batch update
AWQ_GRID = 20  # alpha in {0, 1/20, ..., 1}
AWQ_SEARCH_TOKENS = 1024  # calibration rows the AWQ loss is measured on (the mean |x| uses all of them)
HERE = os.path.dirname(os.path.abspath(__file__))
TEXT_FIXTURE = os.path.join(HERE, "tests", "data", "hamlet.txt")  # public domain; see tests/data/README.md
EVAL_TOKENS = 20 * 1024  # perplexity: the first 20 windows of 1024 tokens of the text
CALIB_START = 40_000  # calibration: tokens from here on (disjoint from the perplexity part)


def check_options(mode: str, group_size: int | None, head: str = "int8") -> int | None:
    """Validates mode/group size/head; returns the group size to use (None for int8)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode '{mode}' (choose from {', '.join(MODES)})")
    if head not in HEAD_MODES:
        raise ValueError(f"unknown head quantization '{head}' (choose from {', '.join(HEAD_MODES)})")
    if mode == "int8" and head != "int4":
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported (choose from {', '.join(map(str, GROUP_SIZES))})")
    return group_size


# ---------------------------------------------------------------- quantization math (plain tensors)

def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scales bf16 [N]) with w ~= q * scale, |q| <= 127."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(SCALE_DTYPE)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest grid of w [N, K]: (scales, zeros) fp32 [N, K // G], both exactly bf16 values.

    Each group spans [min, max] in 16 steps: scale = (max - min) / 15, zero = min + 8 * scale."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8).to(SCALE_DTYPE).float()
    zeros = (lo + 8 * scales).to(SCALE_DTYPE).float()
    return scales, zeros


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """w [N, K] on the grid (scales, zeros [N, K // G]) -> codes int32 [N, K] in 0..15."""
    N, K = w.shape
    G = K // scales.shape[1]
    wg = w.float().reshape(N, -1, G)
    q = ((wg - zeros[..., None]) / scales[..., None] + 8).round().clamp(0, 15)
    return q.reshape(N, K).to(torch.int32)


def int4_dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> fp32 [N, K]: w = (q - 8) * scale + zero."""
    N, K = q.shape
    G = K // scales.shape[1]
    w = (q.float().reshape(N, -1, G) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(N, K)


def int4_fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round-to-nearest int4 and back: what the weight becomes (fp32)."""
    scales, zeros = int4_grid(w, group_size)
    return int4_dequantize(int4_codes(w, scales, zeros), scales, zeros)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0..15) -> uint8 [N, K / 2]; element 2i in the low nibble. The portable checkpoint layout."""
    q = q.to(torch.uint8)
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> codes int32 [N, K]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


# ---------------------------------------------------------------- modules

def use_gemv(device) -> bool:
    """Whether quantized linears on device run gemv.py's Triton kernels: CUDA with Triton, unless FLINT_GEMV=0.
    Decided when a module is built (its forward stays free of checks that torch.compile would have to trace)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return device.type == "cuda" and gemv.enabled() and gemv.available(device)


def use_cpu_kernels(device) -> bool:
    """Whether quantized linears on device run cpu_kernels.py's AVX2 kernels (a CPU that has them, a C compiler,
    FLINT_CPU_KERNELS != 0)."""
    return (torch.device(device).type if device is not None else "cpu") == "cpu" and cpu_kernels.available()


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b, with q int8 [N, K] and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.gemv = use_gemv(device)
        self.cpu_q8 = not self.gemv and use_cpu_kernels(device) and in_features % 32 == 0

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        q, scales = int8_quantize(linear.weight.detach())
        return cls.from_codes(q, scales, linear.bias)

    @classmethod
    def from_codes(cls, q, scales, bias=None) -> "Int8Linear":
        m = cls(q.shape[1], q.shape[0], bias is not None, device=q.device)
        m.weight.copy_(q)
        m.scales.copy_(scales.to(SCALE_DTYPE))
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    @property
    def fuses_glu(self) -> bool:
        """forward(x, glu=True) applies SwiGLU inside the kernel (gemv.py's epilogue; a bias would come first)."""
        return self.gemv and self.bias is None and gemv.glu_enabled()

    fuses_ops = True  # forward takes model.linear's norm, residual and rope (see gemv.Linear)

    def forward(self, x, glu: bool = False, norm=None, residual=None, rope=None):
        """x [..., K] -> y [..., N], or with glu (a [gate; up] weight) SiLU(gate) * up [..., N / 2]; norm =
        (weight, eps): of RMSNorm(x); residual: added to the output; rope = (cos, sin, heads): RoPE on the
        output's first heads (in gemv's kernel where it can)."""
        if self.cpu_q8 and x.device.type == "cpu":  # (a module built on the CPU may have moved since)
            return cpu_kernels.fused_linear(torch.ops.flint.cpu_q8_linear, (self.weight, self.scales), x, self.bias,
                                            glu, norm, residual, rope)
        out = gemv.ops_outside_kernel(self, x, glu, norm, residual, rope, self.gemv)
        if out is not None:
            return out
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        fused = glu and self.fuses_glu
        if self.gemv:
            y = torch.ops.flint.int8_linear(x2.to(SCALE_DTYPE).contiguous(), self.weight, self.scales, fused,
                                            *gemv.fused_op_args(norm, residual, rope))
        elif x.device.type == "cuda":  # without Triton: dequantize, then cuBLAS
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(SCALE_DTYPE).contiguous(), self.weight, self.scales)
        return _finish(y.to(x.dtype), self.bias, glu and not fused, x.shape)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _finish(y, bias, glu, x_shape):
    """A quantized linear's y [M, N]: + bias, SwiGLU if asked and not done in the kernel, x's leading dims."""
    y = y + bias if bias is not None else y
    y = gemv.silu_mul(y) if glu else y
    return y.reshape(*x_shape[:-1], y.shape[-1])


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def pack_int4(q: torch.Tensor, device) -> torch.Tensor:
    """codes int32 [N, K] -> the packed weight the int4 kernel of `device` reads."""
    device = torch.device(device)
    if device.type == "cuda":
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # tinygemm: element 2i in the high nibble
        return torch.ops.aten._convert_weight_to_int4pack(u8.to(device).contiguous(), _inner_k_tiles(q.shape[1]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).cpu().contiguous(), 1).to(device)


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W = (q - 8) * scale + zero per group of `group_size` input columns.

    If group_size does not divide in_features the weight is zero-padded to k_padded columns (and x with it)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.k_padded = math.ceil(in_features / group_size) * group_size
        dev = torch.device(device) if device is not None else torch.device("cpu")
        # gemv.py's int4 kernels on CUDA (FLINT_GEMV_INT4=0: tinygemm): on the H200, llama-3-8b at batch 1,
        # 404 against tinygemm's 353 tok/s in one machine session (see BENCHMARKS.md)
        int4_gemv = use_gemv(dev) and os.environ.get("FLINT_GEMV_INT4", "1") != "0"
        q4 = (use_cpu_kernels(dev) and self.k_padded == in_features  # (its norm, if fused, spans in_features)
              and cpu_kernels.supports_q4(out_features, in_features, group_size))
        self.layout = "gemv" if int4_gemv else "tinygemm" if dev.type == "cuda" else "cpu_q4" if q4 else "cpu"
        n_groups = self.k_padded // group_size
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8, device=device))  # set by set_codes
        sz_shape = {"gemv": (out_features, n_groups, 2), "cpu_q4": (out_features // 8, n_groups, 2, 8)}
        self.register_buffer("scales_and_zeros", torch.empty(
            sz_shape.get(self.layout, (n_groups, out_features, 2)), dtype=SCALE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, q, scales, zeros, in_features: int, bias=None, device=None) -> "Int4Linear":
        """q int32 [N, K_padded], scales/zeros [N, K_padded // G] -> a module on device."""
        N, Kp = q.shape
        device = device if device is not None else q.device
        m = cls(in_features, N, Kp // scales.shape[1], bias is not None, device=device)
        m.set_codes(q, scales, zeros)
        if bias is not None:
            m.bias.data = bias.detach().to(device).clone()
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        w = _pad_columns(linear.weight.detach().float(), group_size)
        scales, zeros = int4_grid(w, group_size)
        return cls.from_codes(int4_codes(w, scales, zeros), scales, zeros, linear.in_features, linear.bias)

    def set_codes(self, q, scales, zeros):
        dev = self.scales_and_zeros.device
        if self.layout == "cpu_q4":
            self.weight = cpu_kernels.pack_q4(q.to(dev))
            self.scales_and_zeros = cpu_kernels.pack_scales(scales.to(dev), zeros.to(dev))
            return
        sz = torch.stack([scales.float(), zeros.float()], dim=-1)  # [N, K/G, 2]
        if self.layout == "gemv":
            self.weight = pack_nibbles(q.to(dev)).contiguous()
        else:
            self.weight = pack_int4(q.to(dev), dev)
            sz = sz.transpose(0, 1)  # [K/G, N, 2]
        self.scales_and_zeros = sz.to(device=dev, dtype=SCALE_DTYPE).contiguous()

    @property
    def fuses_glu(self) -> bool:
        """forward(x, glu=True) applies SwiGLU inside the kernel (gemv.py's epilogue; a bias would come first)."""
        return self.layout == "gemv" and self.bias is None and gemv.glu_enabled()

    def _mm(self, x2, scales_and_zeros, glu=False, norm=None, residual=None, rope=None):
        if self.layout == "gemv":
            return torch.ops.flint.int4_linear(x2, self.weight, scales_and_zeros, self.group_size, glu,
                                               *gemv.fused_op_args(norm, residual, rope))
        if x2.device.type == "cuda":  # tinygemm: ~0.38 of copy bandwidth at batch 1
            return torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, scales_and_zeros)

    def codes(self) -> torch.Tensor:
        """The int32 codes [N, K_padded]. Packed for aten's kernels they are read back through the kernel
        itself: with scale 1 and zero 8 it computes x @ q^T, so x = identity rows give q exactly."""
        if self.layout == "gemv":
            return unpack_nibbles(self.weight)
        if self.layout == "cpu_q4":
            return cpu_kernels.unpack_q4(self.weight)
        ones = torch.empty_like(self.scales_and_zeros)
        ones[..., 0], ones[..., 1] = 1, 8
        eye = torch.eye(self.k_padded, dtype=SCALE_DTYPE, device=self.weight.device)
        rows = [self._mm(eye[i:i + 1024], ones) for i in range(0, self.k_padded, 1024)]  # [K, N] in chunks
        return torch.cat(rows).t().round().to(torch.int32)

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (scales, zeros), each [N, K_padded // G]."""
        if self.layout == "cpu_q4":
            return cpu_kernels.unpack_scales(self.scales_and_zeros)
        sz = self.scales_and_zeros.float()
        sz = sz if self.layout == "gemv" else sz.transpose(0, 1)
        return sz[..., 0], sz[..., 1]

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, in_features]."""
        return int4_dequantize(self.codes(), *self.scales_zeros())[:, : self.in_features]

    fuses_ops = True  # forward takes model.linear's norm, residual and rope (see gemv.Linear)

    def forward(self, x, glu: bool = False, norm=None, residual=None, rope=None):
        """x [..., K] -> y [..., N], or with glu (a [gate; up] weight) SiLU(gate) * up [..., N / 2]; norm =
        (weight, eps): of RMSNorm(x); residual: added to the output; rope = (cos, sin, heads): RoPE on the
        output's first heads (in gemv's kernel where it can)."""
        if self.layout == "cpu_q4":
            return cpu_kernels.fused_linear(torch.ops.flint.cpu_q4_linear,
                                            (self.weight, self.scales_and_zeros, self.group_size), x, self.bias, glu,
                                            norm, residual, rope)
        out = gemv.ops_outside_kernel(self, x, glu, norm, residual, rope,
                                      self.layout == "gemv" and self.k_padded == self.in_features)
        if out is not None:
            return out
        x2 = x.reshape(-1, self.in_features).to(SCALE_DTYPE)  # [M, K]
        if self.k_padded != self.in_features:
            x2 = F.pad(x2, (0, self.k_padded - self.in_features))
        fused = glu and self.fuses_glu
        y = self._mm(x2.contiguous(), self.scales_and_zeros, fused, norm, residual, rope)
        return _finish(y.to(x.dtype), self.bias, glu and not fused, x.shape)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
                f"{f', k_padded={self.k_padded}' if self.k_padded != self.in_features else ''}, "
                f"bias={self.bias is not None}, layout={self.layout}")


def _pad_columns(w: torch.Tensor, group_size: int) -> torch.Tensor:
    k = w.shape[1]
    return F.pad(w, (0, -k % group_size)) if k % group_size else w


# ---------------------------------------------------------------- model surgery

def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _quant_plan(model: Transformer, mode: str, group_size: int | None, head: str, pad: bool) -> dict[str, str]:
    """{linear name: "int8" | "int4"} for every nn.Linear to replace; checks shapes first (one clear error)."""
    body = "int8" if mode == "int8" else "int4"
    plan = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        kind = body if name != "lm_head" else (None if head == "none" else head)
        if kind is None:
            continue
        if kind == "int4":
            if m.in_features % group_size and not pad:
                divisors = [g for g in GROUP_SIZES if m.in_features % g == 0]
                raise ValueError(f"group size {group_size} does not divide in_features {m.in_features} of '{name}' "
                                 f"(use --group-size {' or '.join(map(str, divisors)) or '32 with --pad'}, or --pad "
                                 f"to zero-pad the inputs)")
            if m.out_features % 16:
                raise ValueError(f"int4 needs out_features divisible by 16; '{name}' has {m.out_features}")
        plan[name] = kind
    return plan


def quantize_model(model: Transformer, mode: str, group_size: int | None = None, calibration=None, *,
                   head: str = "int8", act_order: bool = False, pad: bool = False, progress: bool = False) -> Transformer:
    """Replaces the model's nn.Linear layers by Int8Linear / Int4Linear, in place; returns the model.

    mode: int8 (per channel) | int4 (round to nearest) | int4-gptq | int4-awq. group_size: 32/64/128 for int4.
    calibration: token ids [B, T] (LongTensor) for GPTQ and AWQ; real text, a few thousand tokens.
    head: how lm_head is stored (int8 by default; "none" keeps it in float). pad: zero-pad in_features up to
    a multiple of the group size instead of refusing. act_order: GPTQ quantizes columns by decreasing Hessian
    diagonal (with the groups' grids fixed up front, so the packed layout stays contiguous)."""
    group_size = check_options(mode, group_size, head)
    plan = _quant_plan(model, mode, group_size, head, pad)
    if mode in ("int4-gptq", "int4-awq"):
        if calibration is None:
            raise ValueError(f"mode {mode} needs calibration token ids (calibration=LongTensor [B, T])")
        calibration = torch.as_tensor(calibration, dtype=torch.long, device=model.embed_tokens.weight.device)
        if calibration.dim() != 2:
            raise ValueError(f"calibration must be token ids [batch, seq_len], got shape {list(calibration.shape)}")
    if mode == "int4-gptq":
        _gptq_model(model, calibration, group_size, act_order, progress)
    elif mode == "int4-awq":
        _awq_model(model, calibration, group_size, progress)
    for name, kind in plan.items():  # whatever is still nn.Linear: round to nearest
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            _set_module(model, name, Int8Linear.from_float(m) if kind == "int8" else Int4Linear.from_float(m, group_size))
    model.quantization_config = {"quant_method": "flint", "mode": mode, "group_size": group_size, "head": head,
                                 "act_order": act_order if mode == "int4-gptq" else None}
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of all weights (parameters and quantized buffers), shared tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- calibration: one block at a time

# Linears that read the same input share its statistics (GPTQ's Hessian, AWQ's activation scale).
# (model.py fuses q/k/v into qkv_proj and gate/up into gate_up_proj, so each group is one linear today.)
INPUT_GROUPS = {"qkv": ("self_attn.qkv_proj",), "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_up_proj",),
                "down": ("mlp.down_proj",)}


@torch.no_grad()
def _each_block(model: Transformer, tokens: torch.Tensor, fn, progress: bool, desc: str):
    """Runs calibration tokens [B, T] through the model block by block. For block i: captures the inputs of its
    linears as {input group: X [B*T, K] fp32}, calls fn(i, block, inputs, run) where run(b) is block b's output
    on this block's input, then feeds the block's output (as fn left the block) to the next one."""
    B, T = tokens.shape
    x = model.embed_tokens(tokens)
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    cos, sin = rope_cos_sin(model.inv_freq, pos, model.rope_factor, x.dtype)
    t0 = time.perf_counter()
    for i, block in enumerate(model.layers):
        inputs, hooks = {}, []
        for group, names in INPUT_GROUPS.items():
            def grab(mod, args, group=group):
                inputs[group] = args[0].reshape(-1, args[0].shape[-1]).float()
            hooks.append(block.get_submodule(names[0]).register_forward_pre_hook(grab))
        block(x, cos, sin, pos, None, None)
        for h in hooks:
            h.remove()
        fn(i, block, inputs, lambda b: b(x, cos, sin, pos, None, None))
        x = block(x, cos, sin, pos, None, None)
        if progress:
            print(f"\r{desc}: block {i + 1}/{len(model.layers)} ({time.perf_counter() - t0:.0f} s)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)


# ---------------------------------------------------------------- GPTQ (Frantar et al. 2022)

def gptq_quantize(w: torch.Tensor, H: torch.Tensor, group_size: int, act_order: bool = False,
                  damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK):
    """GPTQ on one weight w [N, K] with Hessian H = 2/n X^T X [K, K] (K a multiple of group_size).

    Columns are quantized one at a time; each one's rounding error, divided by the pivot of the inverse
    Hessian's Cholesky factor, is spread over the columns not yet quantized (the optimal update of the
    remaining weights for the layer's output on the calibration inputs). Updates are applied lazily, `block`
    columns at a time. Returns (codes int32 [N, K], scales [N, K/G], zeros [N, K/G])."""
    W = w.float().clone()
    N, K = W.shape
    H = H.float().clone()
    dead = H.diagonal() == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    n_groups = K // group_size
    scales = torch.zeros(N, n_groups, device=W.device)
    zeros = torch.zeros(N, n_groups, device=W.device)
    if act_order:
        # static groups: grids from the unmodified weight, so each group's grid is fixed before its columns
        # are visited in act order (the packed layout needs contiguous groups)
        scales, zeros = int4_grid(W, group_size)
        perm = torch.argsort(H.diagonal(), descending=True)
    else:
        perm = torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # H^-1 = U^T U
    Q = torch.zeros(N, K, dtype=torch.int32, device=W.device)
    groups = perm // group_size  # group of each (permuted) column
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E = torch.zeros_like(W1)
        for j in range(i2 - i1):
            col = int(perm[i1 + j])
            g = col // group_size
            if not act_order and col % group_size == 0:  # a new group: its grid from the updated weights
                span = W1[:, j:j + group_size] if j + group_size <= i2 - i1 else W[:, i1 + j:i1 + j + group_size]
                scales[:, g], zeros[:, g] = (t[:, 0] for t in int4_grid(span, group_size))
            s, z = scales[:, groups[i1 + j]], zeros[:, groups[i1 + j]]
            w_col = W1[:, j]
            q = ((w_col - z) / s + 8).round().clamp(0, 15)
            Q[:, i1 + j] = q.to(torch.int32)
            e = (w_col - ((q - 8) * s + z)) / U1[j, j]
            W1[:, j:] -= e[:, None] * U1[j, j:][None, :]
            E[:, j] = e
        W[:, i2:] -= E @ U[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return Q, scales, zeros


def _gptq_model(model, tokens, group_size, act_order, progress):
    def quantize_block(i, block, inputs, run):
        for group, names in INPUT_GROUPS.items():
            X = inputs[group]  # [n, K]
            X = _pad_columns(X, group_size)
            H = X.t() @ X * (2 / X.shape[0])
            linears = [block.get_submodule(n) for n in names]
            # rows are independent given H: quantize the group's weights as one stacked matrix
            W = _pad_columns(torch.cat([m.weight.detach().float() for m in linears]), group_size)
            Q, scales, zeros = gptq_quantize(W, H, group_size, act_order)
            start = 0
            for name, m in zip(names, linears):
                rows = slice(start, start + m.out_features)
                start += m.out_features
                _set_module(block, name, Int4Linear.from_codes(Q[rows], scales[rows], zeros[rows], m.in_features,
                                                               m.bias, device=m.weight.device))

    _each_block(model, tokens, quantize_block, progress, "gptq")


# ---------------------------------------------------------------- AWQ (Lin et al. 2023)

def awq_search(X: torch.Tensor, W: torch.Tensor, group_size: int, tie: tuple[int, int] | None = None,
               grid: int = AWQ_GRID, n_search: int = AWQ_SEARCH_TOKENS) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale s [K] for weights W [N, K] reading inputs X [n, K]: s = mean|x|^alpha, with alpha
    on a grid in [0, 1] chosen to minimise ||X W^T - X (Q(W s) / s)^T||^2 (Q: int4 round to nearest).
    Salient channels (large activations) get larger weights, hence finer relative rounding.
    tie=(n_kv, n_rep): channels are [n_kv, n_rep, head_dim] and s must be equal across n_rep (the attention
    output: s is folded into v_proj's rows, which GQA shares between n_rep heads). Returns (s, best alpha)."""
    x_mean = X.abs().mean(dim=0)
    if tie is not None:
        n_kv, n_rep = tie
        x_mean = x_mean.reshape(n_kv, n_rep, -1).mean(dim=1, keepdim=True).expand(n_kv, n_rep, -1).reshape(-1)
    Xs = X[:: max(1, X.shape[0] // n_search)][:n_search]
    ref = Xs @ W.t()
    best, best_alpha, best_s = float("inf"), 0.0, torch.ones_like(x_mean)
    for i in range(grid + 1):
        alpha = i / grid
        s = x_mean.clamp(min=1e-5).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre around 1 so neither W*s nor 1/s goes extreme
        Wq = int4_fake_quantize(_pad_columns(W * s, group_size), group_size)[:, : W.shape[1]] / s
        err = (Xs @ Wq.t() - ref).pow(2).mean().item()
        if err < best:
            best, best_alpha, best_s = err, alpha, s
    return best_s, best_alpha


def _awq_model(model, tokens, group_size, progress):
    """Searches scales block by block on float weights and folds them in exactly: the input side of each
    scaled group is divided by s (RMSNorm weight, or the previous linear's output rows: v's rows of qkv_proj,
    up's rows of gate_up_proj), its weights are multiplied by s. Rounding to nearest happens afterwards."""
    args = model.args
    n_rep = args.n_heads // args.n_kv_heads

    def fake_quantized(block, plan, scales, use):
        """A copy of the block with group g's scales folded in where use[g], every linear rounded to nearest."""
        b = copy.deepcopy(block)
        fold(b, plan, scales, use)
        for m in b.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = int4_fake_quantize(_pad_columns(m.weight.float(), group_size),
                                                   group_size)[:, : m.in_features].to(m.weight.dtype)
        return b

    def fold(block, plan, scales, use):
        for (linears, prev, tie), s, on in zip(plan, scales, use):
            if not on:
                continue
            for name in linears:
                m = block.get_submodule(name)
                m.weight.data = (m.weight.float() * s).to(m.weight.dtype)
            if tie is not None:  # o_proj's channels [n_kv, n_rep, hd] -> v_proj's rows [n_kv, hd]
                s = s.reshape(tie[0], tie[1], -1)[:, 0].reshape(-1)
            p = block.get_submodule(prev)
            if isinstance(p, nn.Linear):  # the last len(s) output rows: v of qkv_proj, up of gate_up_proj
                rows = slice(p.out_features - len(s), p.out_features)
                p.weight.data[rows] = (p.weight.data[rows].float() / s[:, None]).to(p.weight.dtype)
                if p.bias is not None:
                    p.bias.data[rows] = (p.bias.data[rows].float() / s).to(p.bias.dtype)
            else:  # RMSNorm: y = weight * normalized(x)
                p.weight.data = (p.weight.float() / s).to(p.weight.dtype)

    def scale_block(i, block, inputs, run):
        # input group -> (linears reading it, what 1/s folds into, tie)
        plan = [(INPUT_GROUPS["qkv"], "input_layernorm", None),
                (INPUT_GROUPS["o"], "self_attn.qkv_proj", (args.n_kv_heads, n_rep)),  # v: its last rows
                (INPUT_GROUPS["gate_up"], "post_attention_layernorm", None),
                (INPUT_GROUPS["down"], "mlp.gate_up_proj", None)]  # up: its last rows
        scales = []
        for group, (linears, prev, tie) in zip(INPUT_GROUPS, plan):  # search all on the block as captured
            W = torch.cat([block.get_submodule(n).weight.detach().float() for n in linears])
            scales.append(awq_search(inputs[group], W, group_size, tie)[0])
        # Each search assumed the linear it folds into stays as it was, but v_proj and up_proj are rounded
        # too, after their rows were divided. So check on the whole block: drop, greedily, any group's scales
        # whose removal lowers the rounded block's output error (a guard, not in the paper).
        ref = run(block)

        def error(use):
            return (run(fake_quantized(block, plan, scales, use)) - ref).pow(2).mean().item()

        use = [True] * len(plan)
        best = error(use)
        for g in range(len(plan)):
            trial = use[:g] + [False] + use[g + 1:]
            if (e := error(trial)) < best:
                use, best = trial, e
        fold(block, plan, scales, use)

    _each_block(model, tokens, scale_block, progress, "awq")


# ---------------------------------------------------------------- checkpoints

def hf_config(args: ModelArgs) -> dict:
    """ModelArgs -> a Hugging Face config.json dict that ModelArgs.from_hf reads back to the same args."""
    config = {"model_type": args.arch, "architectures": [{"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
                                                         .get(args.arch, "LlamaForCausalLM")],
              "vocab_size": args.vocab_size, "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
              "intermediate_size": args.ffn_dim, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "rope_scaling": args.rope_scaling, "max_position_embeddings": args.max_seq_len,
              "tie_word_embeddings": args.tie_embeddings, "attention_bias": args.attn_bias,
              "sliding_window": args.sliding_window}
    if args.arch == "qwen2":
        config.update(use_sliding_window=args.sliding_window is not None, max_window_layers=args.window_from_layer)
    config.update({k: v for k, v in args.extra.items() if k in ("bos_token_id", "eos_token_id")})
    return config


def quantized_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The portable checkpoint: float tensors as they are, Int8Linear as weight + scales, Int4Linear as
    qweight (uint8 [N, K_padded / 2], low nibble first) + scales_and_zeros [K_padded / G, N, 2]."""
    out = {}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    for name, m in quantized.items():
        if isinstance(m, Int8Linear):
            out[f"{name}.weight"], out[f"{name}.scales"] = m.weight, m.scales
        else:
            out[f"{name}.qweight"] = pack_nibbles(m.codes())
            out[f"{name}.scales_and_zeros"] = torch.stack(m.scales_zeros(), dim=-1).transpose(0, 1).to(SCALE_DTYPE)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias
    for name, t in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in quantized or (name == "lm_head.weight" and model.lm_head.weight is model.embed_tokens.weight):
            continue
        out[name] = t
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_quantized(model: Transformer, out_dir: str, config: dict | None = None):
    """Writes out_dir/model.safetensors and out_dir/config.json (config, default hf_config(model.args), plus
    quantization_config: quant_method "flint", mode, group_size, head, act_order)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config = dict(config or hf_config(model.args))
    config["quantization_config"] = dict(model.quantization_config)
    save_file(quantized_state_dict(model), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_quantized(path: str, device="cpu", dtype=torch.float32, progress=False) -> tuple[Transformer, ModelArgs]:
    """A directory written by save_quantized -> (model in eval mode on device, args). Float tensors are cast to
    dtype; int4 weights are packed for device's kernel."""
    from safetensors import safe_open

    from weights import read_json

    device = torch.device(device)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json (not a quantized checkpoint directory)")
    config = read_json(config_file)
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "flint":
        raise ValueError(f"{config_file}: no flint quantization_config (quant_method is {qc.get('quant_method')!r})")
    args = ModelArgs.from_hf(config)
    args.extra.update({k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None})
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no model.safetensors")
    with torch.device("meta"):
        model = Transformer(args)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    with safe_open(file, framework="pt") as sf:
        keys = set(sf.keys())
        get = sf.get_tensor
        done = set()
        for name, m in linears.items():
            bias = get(f"{name}.bias").to(device, dtype) if f"{name}.bias" in keys else None
            if f"{name}.qweight" in keys:
                q = unpack_nibbles(get(f"{name}.qweight"))
                sz = get(f"{name}.scales_and_zeros").float().transpose(0, 1)  # [N, K/G, 2]
                new = Int4Linear.from_codes(q, sz[..., 0], sz[..., 1], m.in_features, bias, device=device)
                done |= {f"{name}.qweight", f"{name}.scales_and_zeros"}
            elif f"{name}.scales" in keys:
                new = Int8Linear.from_codes(get(f"{name}.weight").to(device), get(f"{name}.scales").to(device), bias)
                done |= {f"{name}.weight", f"{name}.scales"}
            else:
                continue
            if new.out_features != m.out_features or new.in_features != m.in_features:
                raise ValueError(f"{file}: quantized '{name}' is [{new.out_features}, {new.in_features}], "
                                 f"expected [{m.out_features}, {m.in_features}]")
            done.add(f"{name}.bias")
            _set_module(model, name, new)
        for name, p in list(model.named_parameters()):
            if name in done:
                continue
            if name not in keys:
                raise ValueError(f"{file}: checkpoint has no tensor '{name}'")
            t = get(name)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{file}: tensor '{name}' has shape {list(t.shape)}, expected {list(p.shape)}")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.Parameter(t.to(device, dtype), requires_grad=False))
    if args.tie_embeddings and not isinstance(model.lm_head, (Int8Linear, Int4Linear)):
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args)[0].to(device)
    model.quantization_config = qc
    return model.eval().requires_grad_(False), args


# ---------------------------------------------------------------- GGUF: Q4_0 / Q4_1 / Q8_0 kept packed

def gguf_linear(blocks: torch.Tensor, type_name: str, bias=None, device="cpu") -> nn.Module:
    """Raw GGUF blocks uint8 [N, K / 32, block_bytes] of one weight -> Int4Linear (Q4_0, Q4_1; group 32) or
    Int8Linear (Q8_0). No float weights in between for the int4 types: the 4-bit codes are copied as they are,
    d and m (fp16) become scale = d, zero = m + 8 d (Q4_1) or zero = 0 (Q4_0), rounded to bf16 (the kernels'
    dtype; relative error <= 2^-9 on each). Q8_0 has one scale per 32 weights where Int8Linear has one per
    row, so it is dequantized and requantized per row (an extra rounding; quantified in the tests)."""
    import weights

    N, nb, _ = blocks.shape
    if type_name in ("Q4_0", "Q4_1"):
        d = blocks[..., :2].contiguous().view(torch.float16).float()[..., 0]  # [N, nb]
        qs = blocks[..., 2:] if type_name == "Q4_0" else blocks[..., 4:]  # [N, nb, 16]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(N, nb * 32).to(torch.int32)  # low nibbles first
        if type_name == "Q4_0":  # w = (q - 8) d
            zeros = torch.zeros_like(d)
        else:  # w = q d + m = (q - 8) d + (m + 8 d)
            zeros = blocks[..., 2:4].contiguous().view(torch.float16).float()[..., 0] + 8 * d
        return Int4Linear.from_codes(q, d, zeros, nb * 32, bias, device=device)
    if type_name == "Q8_0":
        w = weights.dequantize(blocks.to(device), 8)  # ggml type 8: Q8_0
        return Int8Linear.from_codes(*int8_quantize(w), bias)
    raise ValueError(f"GGUF type {type_name} has no packed layout here (supported: Q4_0, Q4_1, Q8_0)")


def quantized_from_gguf(path: str, device="cpu", dtype=torch.float32, progress=False):
    """A GGUF file -> (model, args, info) like weights.load_model, with every Q4_0/Q4_1/Q8_0 linear weight as an
    Int4Linear (group 32) / Int8Linear straight from its blocks; other tensors are dequantized to dtype.
    A tied lm_head takes token_embd's blocks."""
    import weights

    from model import fused_parts

    model, args, info = weights.load_model(path, device, dtype, progress)
    _, tensors = weights.read_gguf(info["path"])
    ours = {weights.gguf_name(n): t for n, t in tensors.items() if weights.gguf_name(n)}
    if "lm_head.weight" not in ours:
        ours["lm_head.weight"] = ours["embed_tokens.weight"]
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear):
            continue
        parts = [p for p, _ in fused_parts(f"{name}.weight", args) or [(f"{name}.weight", None)]]  # HF names
        ts = [ours.get(p) for p in parts]
        if any(t is None for t in ts) or len({t.type_name for t in ts}) != 1 or ts[0].type_name not in (
                "Q4_0", "Q4_1", "Q8_0"):
            continue  # a float tensor, or parts of different types: stays as loaded (dequantized)
        pieces = []
        for p, t in zip(parts, ts):
            blocks = weights.gguf_raw_blocks(t)
            if args.arch == "llama" and (".q_proj." in p or ".k_proj." in p):  # llama.cpp's row order for its rope
                blocks = weights._unpermute(blocks, args.n_heads if ".q_proj." in p else args.n_kv_heads)
            pieces.append(blocks)
        _set_module(model, name, gguf_linear(torch.cat(pieces).contiguous(), ts[0].type_name, m.bias, device))
    model.quantization_config = {"quant_method": "flint", "mode": "gguf", "group_size": 32, "head": "int8",
                                 "act_order": None}
    return model, args, info


# ---------------------------------------------------------------- quality: perplexity on held-out text

def text_tokens(tokenizer, path: str = TEXT_FIXTURE) -> torch.Tensor:
    with open(path, encoding="utf-8") as f:
        return torch.tensor(tokenizer.encode(f.read(), add_special_tokens=False), dtype=torch.long)


def calibration_tokens(tokenizer, n_seqs: int = 16, seq_len: int = 256, path: str = TEXT_FIXTURE) -> torch.Tensor:
    """[n_seqs, seq_len] token ids from the calibration part of the text (after CALIB_START, disjoint from the
    perplexity part); if the text is short, from its second half."""
    ids = text_tokens(tokenizer, path)
    start = CALIB_START if len(ids) >= CALIB_START + n_seqs * seq_len else len(ids) // 2
    ids = ids[start:start + n_seqs * seq_len]
    if len(ids) < n_seqs * seq_len:
        raise ValueError(f"{path}: too short for {n_seqs} x {seq_len} calibration tokens")
    return ids.reshape(n_seqs, seq_len)


@torch.inference_mode()
def perplexity(model: Transformer, tokens: torch.Tensor, window: int = 1024, n_tokens: int = EVAL_TOKENS) -> float:
    """exp(mean next-token NLL) over the first n_tokens, in independent windows (cache-less forward)."""
    device = model.embed_tokens.weight.device
    tokens = tokens[:n_tokens]
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start:start + window].to(device)[None]  # [1, T]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk)[0, :-1]  # [T - 1, vocab] fp32
        nll += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def quality_table(source=None, group_sizes=GROUP_SIZES, window: int = 1024, n_tokens: int = EVAL_TOKENS,
                  device="cpu", progress: bool = True) -> list[dict]:
    """Perplexity of the model (default: the embedded SmolLM2-135M-Instruct, dequantized to fp32) on the held-out
    text for fp32, bf16, int8 and int4 RTN / GPTQ / AWQ at each group size, and RTN with lm_head int4 too
    ("int4+head"; the others keep it int8). One dict per row: variant, group_size, ppl, delta_vs_bf16_pct,
    weight_mb, seconds (to quantize), tokens. Group sizes that do not divide a layer's
    width are run with zero padding (noted in the row). On CUDA the int4 rows use gemv.py (tinygemm without
    Triton) instead of the CPU kernel: same weights, same bf16 activations, different summation order."""
    import weights
    from tokenizer import load_tokenizer

    device = torch.device(device)
    base, args, info = weights.load_model(source, device, torch.float32, progress=False)
    tokenizer = load_tokenizer(info)
    ids = text_tokens(tokenizer)
    if len(ids) < n_tokens:
        raise ValueError(f"{TEXT_FIXTURE}: {len(ids)} tokens, fewer than the {n_tokens} asked for")
    calib = calibration_tokens(tokenizer).to(device)
    rows = []

    def run(variant, make, group_size=None, note=""):
        t0 = time.perf_counter()
        model = make()
        quant_s = time.perf_counter() - t0
        ppl = perplexity(model, ids, window, n_tokens)
        row = {"variant": variant, "group_size": group_size, "ppl": ppl, "weight_mb": model_bytes(model) / 1e6,
               "quantize_s": round(quant_s, 1), "eval_s": round(time.perf_counter() - t0 - quant_s, 1),
               "tokens": min(n_tokens, len(ids)), "note": note}
        rows.append(row)
        if progress:
            print(f"{variant:10s} g{group_size or '-':<4} ppl {ppl:8.3f}  ({row['quantize_s']} s + {row['eval_s']} s)",
                  file=sys.stderr, flush=True)

    run("fp32", lambda: base)
    run("bf16", lambda: copy.deepcopy(base).to(torch.bfloat16))
    run("int8", lambda: quantize_model(copy.deepcopy(base), "int8"))
    for g in group_sizes:
        pad = any(m.in_features % g for m in base.modules() if isinstance(m, nn.Linear))
        note = f"in_features padded to a multiple of {g}" if pad else ""
        for mode in ("int4", "int4-gptq", "int4-awq"):
            run(mode, lambda: quantize_model(copy.deepcopy(base), mode, g, calib, pad=pad), g, note)
        # lm_head in int4 too (--quant-head int4, as gpt-fast quantizes): what the int8 head saves
        run("int4+head", lambda: quantize_model(copy.deepcopy(base), "int4", g, head="int4", pad=pad), g,
            "; ".join(filter(None, (note, "lm_head int4 too"))))
    bf16 = next(r["ppl"] for r in rows if r["variant"] == "bf16")
    for r in rows:
        r["delta_vs_bf16_pct"] = round(100 * (r["ppl"] / bf16 - 1), 2)
    return rows


def format_quality(rows: list[dict]) -> str:
    lines = [f"{'variant':<10} {'group':>5} {'ppl':>9} {'vs bf16':>8} {'weights MB':>10}  note"]
    for r in rows:
        lines.append(f"{r['variant']:<10} {r['group_size'] or '-':>5} {r['ppl']:9.3f} {r['delta_vs_bf16_pct']:+7.2f}% "
                     f"{r['weight_mb']:10.1f}  {r['note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def _save_tokenizer(info: dict, out_dir: str):
    """Puts the tokenizer next to the checkpoint: copies a HF dir's tokenizer files, or writes a GGUF's
    tokenizer as tokenizer.json + tokenizer_config.json."""
    if info["kind"] == "hf_dir":
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "chat_template.jinja"):
            src = os.path.join(info["path"], name)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(out_dir, name))
        return
    from tokenizer import load_tokenizer

    tok = load_tokenizer(info)
    tok.backend.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token,
              "pad_token": tok.pad_token, "chat_template": tok.chat_template}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description="Quantize a model's weights (int8 / int4 RTN / GPTQ / AWQ) and save it.")
    p.add_argument("--model", default=None, help="HF directory, Hub repo id or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--mode", required=True, help=f"one of {', '.join(MODES)}")
    p.add_argument("--group-size", type=int, default=None, help=f"int4 group size: 32, 64 or 128 (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--head", default="int8", help="lm_head: int8 (default), int4 or none (keep float)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--pad", action="store_true", help="zero-pad layers whose width the group size does not divide")
    p.add_argument("--calib-text", default=TEXT_FIXTURE, help="calibration text for GPTQ/AWQ")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        import weights
        from tokenizer import load_tokenizer

        check_options(a.mode, a.group_size, a.head)
        model, args, info = weights.load_model(a.model, a.device, torch.float32, progress=True)
        _quant_plan(model, a.mode, check_options(a.mode, a.group_size, a.head), a.head, a.pad)  # fail before calibrating
        calib = calibration_tokens(load_tokenizer(info), path=a.calib_text) if a.mode in ("int4-gptq", "int4-awq") else None
        t0 = time.perf_counter()
        quantize_model(model, a.mode, a.group_size, calib, head=a.head, act_order=a.act_order, pad=a.pad, progress=True)
        config = None
        if info["kind"] == "hf_dir":
            config = weights.read_json(os.path.join(info["path"], "config.json"))
        save_quantized(model, a.out, config)
        _save_tokenizer(info, a.out)
        print(f"wrote {a.out} ({model_bytes(model) / 1e6:.1f} MB of weights, {time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    except (ValueError, FileNotFoundError, NotImplementedError, ImportError) as e:
        lines = str(e).strip().splitlines()
        sys.exit(f"quantize.py: error: {lines[0] if lines else type(e).__name__}")


if __name__ == "__main__":
    main()
