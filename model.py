"""A Llama-family transformer in plain PyTorch: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM2.

This file stands alone (torch only) so it can be copied into another project. Module and parameter
names mirror Hugging Face's (minus the leading "model."), except that q/k/v and gate/up are fused into
qkv_proj and gate_up_proj (one matmul each); model.load_state_dict(hf_state_dict) fuses them on the way
in and model.hf_state_dict() splits them on the way out.

Attention goes through a cache object handed in by the caller (kv.StaticKVCache, or a paged cache):
    meta = cache.prepare(input_pos, fresh)                 # once per forward: masks, block tables, ...
    y = cache.layers[i].attend(q, k, v, input_pos, meta)   # layer i stores k, v and attends
so the model never knows how or where keys and values are stored. With cache=None it runs plain
causal attention over the tokens it is given (what a training loop or a logits test wants).

A block's linears go through linear(layer, x, norm, glu, residual, rope): residual + layer(norm(x)) with
SwiGLU or RoPE if asked. Plain nn.Linear gets exactly that; flint's GPU linears (gemv.py, quantize.py) do the
norm, the SwiGLU, the residual add and RoPE inside their matmul kernel in a decode step.
"""
import functools
import math
import os
import types
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style: {"rope_type": "linear"|"llama3"|"yarn", "factor": ..., ...}
    max_seq_len: int = 4096  # HF max_position_embeddings
    tie_embeddings: bool = False
    attn_bias: bool = False  # q/k/v bias (Qwen2)
    sliding_window: int | None = None  # Mistral; Qwen2 with use_sliding_window
    window_from_layer: int = 0  # layers >= this use the sliding window (Qwen2's max_window_layers)
    arch: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)  # ids etc. the loader wants to keep

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ("default", "linear", "llama3", "yarn"):
                raise ValueError(f"unsupported rope scaling '{rope_type}' (supported: linear, llama3, yarn)")

    @classmethod
    def from_hf(cls, config: dict) -> "ModelArgs":
        """Reads a Hugging Face config.json dict (model_type llama, mistral, qwen2)."""
        # model_type, or for a config without one its architectures entry (e.g. "LlamaForCausalLM")
        arch = (config.get("architectures") or ["?"])[0]
        model_type = config.get("model_type") or {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                                                  "Qwen2ForCausalLM": "qwen2"}.get(arch, arch)
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported architecture '{model_type}' (supported: llama, mistral, qwen2)")
        # transformers 5 nests rope_theta inside rope_parameters; older configs use rope_theta + rope_scaling
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("llama3", "yarn"):
            rope.setdefault("original_max_position_embeddings",
                            config.get("original_max_position_embeddings", config["max_position_embeddings"]))
        sliding_window = config.get("sliding_window")
        window_from_layer = 0
        if model_type == "qwen2":
            use_window = config.get("use_sliding_window", False)
            sliding_window = sliding_window if use_window else None
            window_from_layer = config.get("max_window_layers", 0)
        if model_type == "llama":
            sliding_window = None
        n_heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            ffn_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type != "default" else None,
            max_seq_len=config.get("max_position_embeddings", 4096),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attn_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            sliding_window=sliding_window,
            window_from_layer=window_from_layer,
            arch=model_type,
        )

    def uses_window(self, layer_idx: int) -> bool:
        return self.sliding_window is not None and layer_idx >= self.window_from_layer

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}


# ---------------------------------------------------------------- RoPE

def rope_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the factor cos/sin are scaled by (YaRN's attention factor)."""
    dim, base = args.head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by factor, blend smoothly in between
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        factor = scaling["factor"]
        old_len = scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = scaling.get("attention_factor")
        if attn_factor is None:
            if scaling.get("mscale") and scaling.get("mscale_all_dim"):
                attn_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
            else:
                attn_factor = mscale(factor)

        def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over old_len
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
        inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
        return inv_freq, float(attn_factor)
    return inv_freq, 1.0


def rope_cos_sin(inv_freq: torch.Tensor, input_pos: torch.Tensor, attn_factor: float, dtype):
    # input_pos [B, T] -> cos, sin [B, T, 1, head_dim] (broadcast over heads), in fp32 as the reference does
    freqs = input_pos.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * attn_factor, emb.sin() * attn_factor
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def apply_rope(x, cos, sin):
    # x [B, T, heads, D]; rotate the two halves of each head (HF convention, not interleaved pairs)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------- checkpoint names

# Hugging Face checkpoints keep q/k/v and gate/up apart; we run each group as one matmul.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_parts(name: str, args: ModelArgs):
    """"layers.0.self_attn.qkv_proj.weight" -> [("layers.0.self_attn.q_proj.weight", rows), (k...), (v...)];
    None for a parameter that is not fused."""
    parts = name.rsplit(".", 2)  # [prefix, module, "weight" | "bias"]
    if len(parts) != 3 or parts[1] not in FUSED:
        return None
    prefix, fused, attr = parts
    if fused == "qkv_proj":
        sizes = [args.n_heads * args.head_dim] + [args.n_kv_heads * args.head_dim] * 2
    else:
        sizes = [args.ffn_dim] * 2
    return [(f"{prefix}.{part}.{attr}", n) for part, n in zip(FUSED[fused], sizes)]


def _fuse_hf_tensors(module, state_dict, prefix, *_):
    """load_state_dict pre-hook: a Hugging Face state dict (q_proj, k_proj, ...) loads as it is."""
    for name in [k for k in state_dict if k.startswith(prefix)]:
        for fused, parts in FUSED.items():
            first = f".{parts[0]}."
            if first in name:
                target = name.replace(first, f".{fused}.")
                pieces = [name.replace(first, f".{p}.") for p in parts]
                if all(p in state_dict for p in pieces):
                    state_dict[target] = torch.cat([state_dict.pop(p) for p in pieces])


# ---------------------------------------------------------------- modules

def linear(layer, x, norm=None, glu=False, residual=None, rope=None):
    """residual + layer(norm(x)), with SwiGLU (SiLU(gate) * up of a [gate; up] output) if glu and RoPE on the
    first `heads` heads of the output if rope = (cos, sin, heads): a block's linears with the ops around them.
    flint's GPU linears (gemv.Linear and quantize.py's, which set fuses_ops) take the norm, the SwiGLU, RoPE and
    the residual add into their one kernel in a decode step, so a block runs its four matmuls and attention and
    nothing else; any other nn.Linear gets the plain ops."""
    if getattr(layer, "fuses_ops", False):
        return layer(x, glu=glu, norm=None if norm is None else (norm.weight, norm.eps), residual=residual,
                     rope=rope)
    y = layer(x if norm is None else norm(x))
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if rope is not None:
        cos, sin, heads = rope
        y = y.unflatten(-1, (-1, cos.shape[-1]))                  # [..., all heads, D]
        y = torch.cat((apply_rope(y[..., :heads, :], cos, sin), y[..., heads:, :]), dim=-2).flatten(-2)
    return y if residual is None else residual + y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window if args.uses_window(layer_idx) else None
        # q, k and v in one matmul: decoding reads the weights once, in one kernel instead of three
        self.qkv_proj = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.attn_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, input_pos, kv, meta, norm=None, residual=None):
        # -> residual + attention(norm(x)) (norm, residual: the block's, see linear())
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        # q, k and v heads side by side, q and k rotated (one rotation for both)
        qkv = linear(self.qkv_proj, x, norm, rope=(cos, sin, H + Hkv)).view(B, T, H + 2 * Hkv, self.head_dim)
        q = qkv[:, :, :H].transpose(1, 2)  # [B, H, T, D]
        k = qkv[:, :, H: H + Hkv].transpose(1, 2)  # [B, Hkv, T, D]
        v = qkv[:, :, H + Hkv:].transpose(1, 2)
        if kv is not None:
            y = kv.attend(q, k, v, input_pos, meta)
        else:
            y = causal_attention(q, k, v, input_pos, self.window)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H*D]
        return linear(self.o_proj, y, residual=residual)


def causal_attention(q, k, v, input_pos, window=None):
    """Attention over just the given tokens (no cache): causal, optionally within a sliding window."""
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    qp, kp = input_pos[:, None, :, None], input_pos[:, None, None, :]  # [B, 1, T, 1], [B, 1, 1, T]
    mask = (kp <= qp) & (kp > qp - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)  # gate and up, one matmul
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x, norm=None, residual=None):
        # -> residual + SwiGLU MLP of norm(x) (norm, residual: the block's, see linear())
        return linear(self.down_proj, linear(self.gate_up_proj, x, norm, glu=True), residual=residual)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, input_pos, kv, meta):
        # h = x + attention(norm(x)), then h + mlp(norm(h)): the norms and adds go to the linears (linear())
        h = self.self_attn(x, cos, sin, input_pos, kv, meta, norm=self.input_layernorm, residual=x)
        return self.mlp(h, norm=self.post_attention_layernorm, residual=h)


def run_layers(layers, x, cos, sin, input_pos, kv_layers, meta):
    """All blocks of a one-token step in a row (what compile_decode(whole_model=True) compiles)."""
    for layer, kv in zip(layers, kv_layers):
        x = Block.forward(layer, x, cos, sin, input_pos, kv, meta)
    return x


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._register_load_state_dict_pre_hook(_fuse_hf_tensors, with_module=True)
        inv_freq, self.rope_factor = rope_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.decode_block = None  # compiled Block.forward for one-token steps (compile_decode)
        self.decode_layers = None  # or: all layers of a one-token step as one compiled graph
        self.decode_embed = self.decode_head = None  # compiled embed and head of those steps

    def forward(self, tokens, input_pos=None, cache=None, logits_at=None, compiled=None):
        """tokens [B, T] -> logits [B, T, vocab] (fp32).

        input_pos [B, T]: the position of every token (rows may be at different positions);
        None means 0..T-1 in every row (a prefill from scratch, which takes the flash path).
        logits_at [B] or [B, K]: if given, only the hidden states at these indices of each row go through
        the head, giving logits [B, 1 or K, vocab] (prefill needs the last prompt token only).
        compiled: run the compiled step of compile_decode (None: for one-token steps only). A caller with
        a few tokens in shapes that repeat (speculative verification, T = k + 1) asks for it too: each
        new shape compiles once more, so it is not for prefills of every length.
        """
        B, T = tokens.shape
        fresh = input_pos is None  # every row starts at position 0: causal attention over these tokens
        if fresh:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        compiled = (T == 1 if compiled is None else compiled) and cache is not None
        if compiled and getattr(self.decode_layers, "owner", id(self)) != id(self):
            self.compile_decode(whole_model=True)  # compiled without module guards for another model (a copy)
        embed, head = Transformer.embed, Transformer.head
        if compiled and self.decode_embed is not None:
            embed, head = self.decode_embed, self.decode_head
        x, cos, sin = embed(self, tokens, input_pos)
        meta = cache.prepare(input_pos, fresh) if cache is not None else None
        if compiled and self.decode_layers is not None:
            x = self.decode_layers(self.layers, x, cos, sin, input_pos, cache.layers, meta)
        else:
            step = self.decode_block if compiled and self.decode_block is not None else Block.__call__
            for i, layer in enumerate(self.layers):
                x = step(layer, x, cos, sin, input_pos, cache.layers[i] if cache is not None else None, meta)
        if logits_at is not None:  # [B] -> one position per row, [B, K] -> K positions per row
            at = logits_at if logits_at.dim() == 2 else logits_at[:, None]
            x = x[torch.arange(B, device=x.device)[:, None], at]  # [B, K, dim]
        return head(self, x)

    def embed(self, tokens, input_pos):
        """tokens, input_pos [B, T] -> x [B, T, dim] and the RoPE cos, sin [B, T, 1, head_dim] there."""
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, input_pos, self.rope_factor, x.dtype)
        return x, cos, sin

    def head(self, x):
        """hidden states [B, K, dim] -> logits [B, K, vocab] in fp32."""
        return self.lm_head(self.norm(x)).float()

    def compile_decode(self, whole_model: bool = False, **compile_kwargs):
        """Compile the one-token step of a block. Every layer runs the same code on the same shapes
        with its own weights and cache tensors as inputs, so it compiles once, not n_layers times;
        prefill (any length) stays eager and never triggers a recompilation. The embedding (with RoPE)
        and the head compile too: a dozen small kernels each when eager.
        whole_model=True compiles the loop over all layers as one graph instead: slower to compile (tens
        of seconds on a CPU) but one call per token instead of n_layers, which is what a CPU wants (no
        CUDA graph hides the cost of a call there)."""
        # one compiled graph per step shape (batch sizes, cache sizes, speculative k + 1): allow many
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        p = next(self.parameters())
        if (p.is_cuda and torch.cuda.get_device_capability(p.device)[0] >= 9 and "options" not in compile_kwargs
                and hasattr(torch._inductor.config.triton, "enable_pdl") and os.environ.get("FLINT_PDL", "1") != "0"):
            # Hopper: each generated kernel may launch while the previous one finishes (programmatic
            # dependent launch) and waits for it on the device; hides a launch gap per kernel
            compile_kwargs["options"] = {"triton.enable_pdl": True}
        own = lambda fn: fn  # noqa: E731
        skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        unguarded = whole_model and skip_module_guards is not None and "options" not in compile_kwargs
        if unguarded:
            # No CUDA graph skips Dynamo's guards on a CPU: before every call they re-check each module's
            # type, attributes, hooks and weights (~3,500 checks, ~1.7 ms of a ~17 ms SmolLM2-135M int4 step on
            # 2 cores). The model is this engine's and does not change after compiling, so the modules' guards
            # go; the inputs' (tokens, positions, caches) stay. Each model then needs graphs of its own: a copy
            # of each function's code object is its own torch.compile cache, and forward() recompiles for a
            # copy of the model (deepcopy, layer_skip_model). Change the model in place: compile_decode again.
            compile_kwargs["options"] = {"guard_filter_fn": skip_module_guards}
            own = lambda fn: types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,  # noqa: E731
                                                fn.__defaults__, fn.__closure__)
        compile = functools.partial(torch.compile, fullgraph=True, dynamic=False, **compile_kwargs)
        if whole_model:
            self.decode_layers = compile(own(run_layers))
            if unguarded:
                self.decode_layers.owner = id(self)
        else:
            self.decode_block = compile(Block.forward)
        # unbound functions (the model is an argument): a deepcopy of the model compiles its own
        self.decode_embed, self.decode_head = compile(own(Transformer.embed)), compile(own(Transformer.head))

    @property
    def compiled_decode(self) -> bool:
        return self.decode_block is not None or self.decode_layers is not None

    def hf_shapes(self) -> dict[str, tuple]:
        """Parameter names and shapes as a Hugging Face checkpoint stores them (q/k/v, gate/up apart)."""
        shapes = {}
        for name, p in self.named_parameters():
            parts = fused_parts(name, self.args)
            for part, size in parts or [(name, None)]:
                shapes[part] = (size, *p.shape[1:]) if size else tuple(p.shape)
        return shapes

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under Hugging Face's names (views, no copies)."""
        out = {}
        for name, t in self.state_dict().items():
            parts = fused_parts(name, self.args)
            if parts:
                out.update(zip([p for p, _ in parts], t.split([n for _, n in parts])))
            else:
                out[name] = t
        return {("model." + k if k != "lm_head.weight" else k): v for k, v in out.items()}

    def load_hf_tensor(self, name: str, tensor: torch.Tensor):
        """Put one tensor of a Hugging Face checkpoint (name without "model.") in place: a fused
        parameter is allocated on the tensor's device at its first part, then filled slice by slice.
        Loaders stream checkpoints through this one tensor at a time into a model built on meta."""
        module_name, _, attr = name.rpartition(".")
        parent_name, _, part = module_name.rpartition(".")
        fused = next((f for f, parts in FUSED.items() if part in parts), None)
        if fused is None:
            setattr(self.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
            return
        linear = self.get_submodule(f"{parent_name}.{fused}")
        param = getattr(linear, attr)
        if param.is_meta:
            param = nn.Parameter(torch.empty(param.shape, device=tensor.device, dtype=tensor.dtype), requires_grad=False)
            setattr(linear, attr, param)
        parts = fused_parts(f"{parent_name}.{fused}.{attr}", self.args)
        i = [p for p, _ in parts].index(name)
        start = sum(n for _, n in parts[:i])
        param.data[start:start + parts[i][1]].copy_(tensor)

    def finish_loading(self, device):
        """After weights were assigned into a model built on the meta device: re-tie, rebuild RoPE buffers."""
        if self.args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(self.args)[0].to(device)
