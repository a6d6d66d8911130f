"""model.py + kv.py against transformers: every family of the issue, prefill and decode logits, fp32."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kv import StaticKVCache
from model import ModelArgs, Transformer

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256, rms_norm_eps=1e-6)

FAMILIES = {
    "llama2-mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0),
    "llama3-gqa": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0),
    "llama-mqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1),
    "llama3.1-rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=32)),
    "llama3.2-tied": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=16)),
    "llama-linear-rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                              rope_scaling=dict(rope_type="linear", factor=4.0)),
    "llama-yarn-rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
    "llama-head-dim": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "smollm2": dict(model_type="llama", num_attention_heads=9, num_key_value_heads=3, hidden_size=72,
                    tie_word_embeddings=True, rope_theta=100000.0),
    "mistral-window": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
    "qwen2-bias": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-window": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=4, max_window_layers=1),
}


def make_pair(name, seed=0):
    cfg = dict(TINY, **FAMILIES[name])
    hf_config = transformers.AutoConfig.for_model(**cfg)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).float().eval()
    with torch.no_grad():  # random norms and biases too, so a wrong mapping cannot hide behind ones/zeros
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n else 0.0))
    args = ModelArgs.from_hf(hf_config.to_dict())
    ours = Transformer(args).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if args.tie_embeddings else set())
    return hf, ours, args


@pytest.mark.parametrize("fresh", [True, False], ids=["flash-prefill", "masked-prefill"])
@pytest.mark.parametrize("name", list(FAMILIES))
@torch.no_grad()
def test_prefill_and_decode_match_transformers(name, fresh):
    hf, ours, args = make_pair(name)
    torch.manual_seed(1)
    prompt_len, new = 9, 6
    tokens = torch.randint(0, args.vocab_size, (2, prompt_len + new))
    ref = hf(tokens).logits  # [B, T, V]: each position's logits given all tokens before it

    assert (ours(tokens) - ref).abs().max() < 1e-4  # no cache: plain causal attention

    cache = StaticKVCache(args, batch_size=2, max_seq_len=32)
    pos = None if fresh else torch.arange(prompt_len).expand(2, -1)  # None: positions 0.. in every row
    out = ours(tokens[:, :prompt_len], pos, cache)
    assert (out - ref[:, :prompt_len]).abs().max() < 1e-4
    for t in range(prompt_len, prompt_len + new):
        out = ours(tokens[:, t:t + 1], torch.full((2, 1), t), cache)
        assert (out[:, 0] - ref[:, t]).abs().max() < 1e-4, f"decode step at position {t}"


@pytest.mark.parametrize("name", ["llama3-gqa", "mistral-window", "qwen2-window"])
@torch.no_grad()
def test_batch_of_different_lengths_equals_each_alone(name):
    """Right-padded rows at their own positions: padding never changes a row's logits."""
    _, ours, args = make_pair(name)
    torch.manual_seed(2)
    lengths, new = [3, 11, 7], 5
    seqs = [torch.randint(0, args.vocab_size, (n + new,)) for n in lengths]

    alone = []
    for s, n in zip(seqs, lengths):
        cache = StaticKVCache(args, 1, 32)
        steps = [ours(s[None, :n], torch.arange(n)[None], cache, logits_at=torch.tensor([n - 1]))[:, 0]]
        for t in range(n, n + new):
            steps.append(ours(s[None, t:t + 1], torch.tensor([[t]]), cache)[:, 0])
        alone.append(torch.cat(steps))

    B, T = len(seqs), max(lengths)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        tokens[b, :n] = s[:n]
    cache = StaticKVCache(args, B, 32)
    lens = torch.tensor(lengths)
    steps = [ours(tokens, torch.arange(T).expand(B, T), cache, logits_at=lens - 1)[:, 0]]
    for i in range(new):
        nxt = torch.stack([s[n + i] for s, n in zip(seqs, lengths)])[:, None]
        steps.append(ours(nxt, (lens + i)[:, None], cache)[:, 0])
    batched = torch.stack(steps, 1)  # [B, new+1, V]
    for b in range(B):
        assert (batched[b] - alone[b]).abs().max() < 1e-4


def test_config_errors():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelArgs.from_hf({"model_type": "gpt2"})
    # a config without model_type is read by its architectures entry
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelArgs.from_hf({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="unsupported architecture '[?]'"):
        ModelArgs.from_hf({})
    args = ModelArgs.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                              "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 128})
    assert args.arch == "llama" and args.n_kv_heads == 4
    with pytest.raises(ValueError, match="rope scaling 'longrope'"):
        ModelArgs(rope_scaling={"rope_type": "longrope", "factor": 2.0})
