"""The engine on the real embedded model: greedy tokens equal transformers', alone and in a batch."""
import pytest
import torch

from sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "List three facts about the Moon:\n1.",
]
NEW = 64


def hf_greedy(hf, ids, n):
    hf.generation_config.eos_token_id = None  # exactly n tokens, as ours with ignore_eos
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def reference(engine, hf_smollm2):
    hf, _ = hf_smollm2
    prompts = PROMPTS + [[{"role": "user", "content": "Explain what a hash table is in two sentences."}]]
    ids = [engine.encode(p, chat=isinstance(p, list)) for p in prompts]
    return ids, [hf_greedy(hf, x, NEW) for x in ids]


def test_greedy_matches_transformers_token_for_token(engine, reference):
    ids, expected = reference
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    for prompt_ids, want in zip(ids, expected):
        [r] = engine.generate([prompt_ids], params)
        assert r.token_ids == want


def test_batch_of_different_lengths_matches_transformers(engine, reference):
    ids, expected = reference
    assert len({len(x) for x in ids}) > 1
    results = engine.generate(ids, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    for r, want in zip(results, expected):
        assert r.token_ids == want


def test_prefill_logits_match_transformers(engine, hf_smollm2):
    hf, _ = hf_smollm2
    ids = torch.tensor([engine.encode(PROMPTS[2])])
    with torch.inference_mode():
        ours = engine.model(ids)
        ref = hf(ids).logits
    assert (ours - ref).abs().max() < 1e-3  # fp32, same dequantized weights; 49152-way logits of size ~20


def test_text_streaming_and_eos(engine):
    pieces = []
    [r] = engine.generate(["What is the capital of France?"], SamplingParams(max_new_tokens=40), chat=True,
                          on_text=lambda row, piece: pieces.append(piece))
    assert "".join(pieces) == r.text
    assert "Paris" in r.text
    assert r.finish_reason == "eos"  # the instruct model ends its turn with <|im_end|>
    assert "<|im_end|>" not in r.text
    assert "".join(engine.stream("What is the capital of France?", SamplingParams(max_new_tokens=40), chat=True)) == r.text


def test_stop_strings_cut_and_never_stream(engine):
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    [full] = engine.generate([PROMPTS[3]], params)
    stop = full.text[10:14]
    pieces = []
    [r] = engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=60, stop=(stop,)),
                          on_text=lambda _, p: pieces.append(p))
    assert r.finish_reason == "stop"
    assert r.text == full.text[: full.text.index(stop)]
    assert "".join(pieces) == r.text


def test_seeded_sampling_is_repeatable(engine):
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=20, seed=123)
    a = engine.generate([PROMPTS[0]], params)[0].token_ids
    b = engine.generate([PROMPTS[0]], params)[0].token_ids
    assert a == b
    c = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.8, max_new_tokens=20, seed=7))[0].token_ids
    assert a != c


def test_repetition_penalty_changes_greedy_output(engine):
    base = engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=40, ignore_eos=True))[0].token_ids
    pen = engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=40, ignore_eos=True,
                                                       repetition_penalty=1.5))[0].token_ids
    assert base != pen


def test_prompt_longer_than_context_is_rejected(engine):
    from scheduler import Engine
    small = Engine(engine.model, engine.tokenizer, engine.device, engine.dtype, max_seq_len=16)
    with pytest.raises(ValueError, match="prompt has 20 tokens but the context is 16 tokens"):
        small.generate([[5] * 20], SamplingParams(max_new_tokens=4))
    # a prompt that fits but leaves too little room: generation stops at the context's end
    [r] = small.generate([[5] * 12], SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert len(r.token_ids) == 4 and r.finish_reason == "length"


def test_context_length_must_be_positive(engine):
    from scheduler import Engine
    with pytest.raises(ValueError, match="--max-seq-len 0: must be a positive integer"):
        Engine(engine.model, engine.tokenizer, engine.device, engine.dtype, max_seq_len=0)


def test_model_in_another_dtype_is_rejected(engine):
    # Engine(model, ...) takes the model as it is: one in another dtype than the engine's gets a clear error
    # at construction, not an index_put failure inside the first step
    from scheduler import Engine
    with pytest.raises(ValueError, match=r"Engine runs torch.bfloat16 on cpu, but the model's parameters are "
                                         r"torch.float32 on cpu: move it first"):
        Engine(engine.model, engine.tokenizer, torch.device("cpu"), torch.bfloat16)


def test_empty_prompt_is_rejected(engine):
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], SamplingParams(max_new_tokens=4))


def test_metrics_summary_without_decode_steps():
    # a request that stops at its first token has no decode rate: the log says so instead of a made-up GB/s
    from scheduler import Metrics

    done = Metrics(batch_size=1, new_tokens=1, ttft_s=0.08, decode_s=1e-6, decode_steps=1, decode_tok_per_s=0.0,
                   weight_bytes_per_step=10**9)
    assert "no tokens after the first" in done.summary() and "GB/s" not in done.summary()
    running = Metrics(batch_size=1, new_tokens=11, ttft_s=0.08, decode_s=0.5, decode_steps=10, decode_tok_per_s=20.0,
                      weight_bytes_per_step=10**9)
    assert "20.0 tok/s" in running.summary() and "~20.0 GB/s" in running.summary()


def test_prefill_leaves_gemv_untuned_and_decode_does_not(engine, monkeypatch):
    # a prompt's prefill is a one-off row count: on a GPU gemv would compile and time ~10 kernels for it
    # (gemv.no_tuning); decode steps tune as before. Static batching, then continuous (paged) batching.
    import gemv
    from scheduler import Engine

    calls = []
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward",
                        lambda tokens, *a, **k: calls.append((tokens.shape[1], gemv._untimed)) or forward(tokens, *a, **k))
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    engine.generate(["The capital of France is"], params)
    assert calls[0][0] > 1 and calls[0][1] == 1 and calls[1:] == [(1, 0), (1, 0)]
    calls.clear()
    paged = Engine(engine.model, engine.tokenizer, engine.device, engine.dtype, max_seq_len=256, kv_tokens=1024,
                   block_size=16, max_batch=4, max_tokens_per_step=64)
    paged.generate(["The capital of France is"], params)
    prefill = [u for n, u in calls if n > 1]
    assert prefill and all(u == 1 for u in prefill) and all(u == 0 for n, u in calls if n == 1)
    assert gemv._untimed == 0
