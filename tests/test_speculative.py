"""Speculative decoding: greedy output is the engine's token for token with every drafter; sampled output
follows the target's distribution exactly (chi-square against enumerated probabilities); KV rollback
leaves the caches as if the rejected drafts were never seen; bad input is a clear ValueError."""
import pytest
import torch

from kv import StaticKVCache
from model import ModelArgs, Transformer
from sampling import SamplingParams, filter_logits, row_params
from scheduler import Engine
from speculative import (ModelDrafter, PromptLookupDrafter, accept_greedy, next_k, self_drafter,
                         speculative_generate)

NEW = 48
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    [{"role": "user", "content": "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog "
                                 "near the river bank, and the dog does not even wake up."}],
]


def tiny_model(vocab, seed, dim=32, n_layers=2, scale=1.0):
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=2 * dim,
                     max_seq_len=256, rope_theta=10000.0)
    model = Transformer(args).eval().requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # sharper or flatter next-token distributions
    return model


@pytest.fixture(scope="module")
def prompt_ids(engine):
    return [engine.encode(p, chat=isinstance(p, list)) for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(engine, prompt_ids):
    """The engine's own greedy tokens, one prompt at a time."""
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    return [engine.generate([ids], params)[0].token_ids for ids in prompt_ids]


def check_greedy(engine, prompt_ids, expected, drafter, rows, new=NEW, **kw):
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    results, stats = speculative_generate(engine, [prompt_ids[i] for i in rows], params, drafter, **kw)
    for r, i in zip(results, rows):
        assert r.token_ids == expected[i][:new], f"prompt {i} differs from target-only greedy"
        assert r.finish_reason == "length"
    assert stats.new_tokens == new * len(rows)
    return stats


def test_greedy_prompt_lookup_matches_engine(engine, prompt_ids, expected):
    for i in range(len(PROMPTS)):
        check_greedy(engine, prompt_ids, expected, PromptLookupDrafter(), [i], k=4)
    # a batch of two prompts of different lengths: rows accept different numbers of drafts
    assert len(prompt_ids[0]) != len(prompt_ids[2])
    stats = check_greedy(engine, prompt_ids, expected, PromptLookupDrafter(), [2, 0], k=6)
    assert stats.accepted > 0  # the chat prompt asks for a copy: lookup drafts must land


def test_greedy_draft_model_matches_engine(engine, prompt_ids, expected):
    # a separate, deliberately bad draft model with the target's vocabulary: nearly every draft is rejected
    draft = tiny_model(engine.args.vocab_size, seed=1, dim=64)
    stats = check_greedy(engine, prompt_ids, expected, ModelDrafter(draft), [0, 2], k=3, adaptive=False)
    assert stats.rounds > 0 and stats.drafted > 0


def test_greedy_self_draft_matches_engine(engine, prompt_ids, expected):
    # (shorter runs: every self-draft step costs most of a target forward)
    check_greedy(engine, prompt_ids, expected, self_drafter(engine), [2, 0], new=32, k=2)
    # keeping every layer, the draft is the target: every draft is accepted (bonus-token path)
    stats = check_greedy(engine, prompt_ids, expected, self_drafter(engine, layers=range(engine.args.n_layers)),
                         [1], new=24, k=5, adaptive=False)
    assert stats.accepted == stats.drafted > 0
    assert stats.mean_accepted_len > 4


def test_eos_stop_and_max_new_tokens_like_engine(engine, prompt_ids):
    params = SamplingParams(max_new_tokens=60, repetition_penalty=1.3)
    [want] = engine.generate([prompt_ids[2]], params)
    [got], _ = speculative_generate(engine, [prompt_ids[2]], params, PromptLookupDrafter(), k=8)
    assert want.finish_reason == "eos"
    assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    # a stop string cuts the text where the engine would, even inside an accepted run of drafts
    stop = want.text[30:36]
    [got], _ = speculative_generate(engine, [prompt_ids[2]], SamplingParams(max_new_tokens=60, repetition_penalty=1.3,
                                                                           stop=(stop,)),
                                    PromptLookupDrafter(), k=8)
    assert got.finish_reason == "stop" and got.text == want.text[: want.text.index(stop)]
    # never more than max_new_tokens, however long the drafts
    [got], _ = speculative_generate(engine, [prompt_ids[2]], SamplingParams(max_new_tokens=5, ignore_eos=True),
                                    PromptLookupDrafter(), k=16)
    assert len(got.token_ids) == 5 and got.finish_reason == "length"


def test_replayed_padded_steps_match_the_plain_path(monkeypatch):
    """The CUDA-graph path (compiled engine on CUDA) simulated on CPU: every step shape is "captured"
    once and replayed into the same output buffer, and verify/catch-up forwards are padded to powers
    of two. Greedy output must equal target-only greedy of the plain engine."""
    import scheduler

    captured = []

    def fake_capture(step):  # a "graph" that re-runs the step into the captured output tensor
        out = step()
        captured.append(tuple(out.shape[:2]))

        class Replay:
            def replay(self):
                out.copy_(step())
        return Replay(), out

    target = tiny_model(40, seed=0)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9]]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    want = [r.token_ids for r in Engine(target, None, torch.device("cpu"), torch.float32).generate(prompts, params)]
    monkeypatch.setattr(scheduler, "capture_cuda_graph", fake_capture)
    monkeypatch.setattr(Engine, "cuda_graphs", property(lambda self: True))
    engine = Engine(target, None, torch.device("cpu"), torch.float32)
    assert [r.token_ids for r in engine.generate(prompts, params)] == want
    for drafter, k in ((PromptLookupDrafter(), 3), (ModelDrafter(tiny_model(40, seed=3)), 3)):
        captured.clear()
        results, stats = speculative_generate(engine, prompts, params, drafter, k=k, adaptive=False)
        assert [r.token_ids for r in results] == want, drafter.name
        assert stats.drafted > 0
        assert all(t & (t - 1) == 0 or t - 1 & (t - 2) == 0 for _, t in captured), captured  # T = 2^i or 2^i + 1


# ---------------------------------------------------------------- KV rollback

def test_kv_rollback_is_as_if_rejected_tokens_were_never_seen():
    torch.manual_seed(0)
    model = tiny_model(50, seed=0)
    prompt = torch.randint(0, 50, (1, 7))
    drafts = torch.randint(0, 50, (1, 4))
    fresh_tail = torch.randint(0, 50, (1, 3))
    with torch.inference_mode():
        cache = StaticKVCache(model.args, 1, 32)
        model(prompt, torch.arange(7)[None], cache)
        # verify [d0..d3] at positions 7..10, accept 1 (d0), reject the rest
        model(drafts, torch.arange(7, 11)[None], cache)
        a = 1
        # continue right after the accepted prefix, over the stale slots
        rolled = model(fresh_tail, torch.arange(7 + a, 7 + a + 3)[None], cache)

        accepted_seq = torch.cat([prompt, drafts[:, :a], fresh_tail], dim=1)
        fresh = StaticKVCache(model.args, 1, 32)
        expect = model(accepted_seq, torch.arange(accepted_seq.shape[1])[None], fresh)[:, -3:]
        no_cache = model(accepted_seq)[:, -3:]
    assert torch.allclose(rolled, expect, atol=1e-5)
    assert torch.allclose(rolled, no_cache, atol=1e-5)


def test_draft_model_rollback_matches_a_fresh_drafter():
    """After rounds with rejections, a ModelDrafter drafts what a fresh one would for the same history."""
    target = tiny_model(40, seed=0)
    engine = Engine(target, None, torch.device("cpu"), torch.float32)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    used = ModelDrafter(tiny_model(40, seed=3))
    results, stats = speculative_generate(engine, [[1, 2, 3, 4, 5], [7, 8]], params, used, k=3, adaptive=False)
    assert 0 < stats.accepted < stats.drafted  # some rounds rolled back
    histories = [[1, 2, 3, 4, 5] + results[0].token_ids, [7, 8] + results[1].token_ids]
    fresh = ModelDrafter(used.model)
    fresh.start(engine, histories, 64)
    drafts_used, _ = used.propose(histories, [3, 3], params)
    drafts_fresh, _ = fresh.propose(histories, [3, 3], params)
    assert drafts_used == drafts_fresh


# ---------------------------------------------------------------- exact sampling

def target_probs(model, prompt, n_tokens, params):
    """Exact probabilities of every continuation of n_tokens tokens, by enumeration:
    {tuple of tokens: probability} under the processed (sampled-from) distribution."""
    V = model.args.vocab_size
    probs = {(): 1.0}
    for _ in range(n_tokens):
        seqs = list(probs)
        x = torch.tensor([prompt + list(s) for s in seqs])
        with torch.inference_mode():
            logits = model(x)[:, -1]
        rows = row_params([params] * len(seqs))
        hist = x if params.repetition_penalty != 1.0 else None
        p = filter_logits(logits, **rows, history=hist).softmax(-1).double()
        probs = {s + (t,): probs[s] * p[i, t].item() for i, s in enumerate(seqs) for t in range(V)}
    return probs


def chi_square_p(counts, probs, n):
    """p-value of Pearson's chi-square test, cells with expected count < 5 pooled into one."""
    obs, exp = [], []
    pool_o = pool_e = 0.0
    for cell, p in probs.items():
        e = p * n
        if e < 5:
            pool_o, pool_e = pool_o + counts.get(cell, 0), pool_e + e
        else:
            obs.append(counts.get(cell, 0))
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    assert sum(counts.get(c, 0) for c in counts if c not in probs) == 0, "impossible sequence drawn"
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(obs) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_new_tokens=4, seed=0, ignore_eos=True),
    SamplingParams(temperature=0.7, top_k=4, max_new_tokens=4, seed=1, ignore_eos=True),
    SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05, repetition_penalty=1.2, max_new_tokens=4, seed=2,
                   ignore_eos=True),
], ids=["t1", "t0.7-topk", "t1.3-topp-minp-rep"])
@pytest.mark.parametrize("drafter", ["draft-model", "prompt-lookup"])
def test_sampled_tokens_follow_the_target_distribution(params, drafter):
    V, N = 5, 4000
    target = tiny_model(V, seed=0, scale=4.0)
    engine = Engine(target, None, torch.device("cpu"), torch.float32)
    # a deliberately mismatched draft (other weights, flatter), or lookup over a repetitive prompt
    d = ModelDrafter(tiny_model(V, seed=5, scale=1.0)) if drafter == "draft-model" else PromptLookupDrafter(2)
    prompt = [0, 1, 2, 3, 0, 1, 2, 4, 0, 1]
    # N independent rows in one batch: each row is one draw of the next 4 tokens
    results, stats = speculative_generate(engine, [prompt] * N, params, d, k=2, adaptive=False)
    assert 0 < stats.accepted < stats.drafted  # both the accept and the reject branch ran
    counts = {}
    for r in results:
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    probs = target_probs(target, prompt, 4, params)
    assert chi_square_p(counts, probs, N) > 1e-3


def test_greedy_acceptance_rule():
    target = [[5, 6, 7, 8], [5, 9, 7, 8], [1, 2, 3, 4], [4, 4, 4, 4]]
    drafts = [[5, 6, 7], [5, 6, 7], [1, 2], []]  # rows 2 and 3: fewer drafts than the padded verify
    accepted, nxt = accept_greedy(target, drafts)
    assert accepted == [3, 1, 2, 0]  # all (bonus 8); first only (correction 9); both of its 2 drafts; none
    assert nxt == [8, 9, 3, 4]


def test_adaptive_k_grows_on_full_acceptance_and_shrinks_on_low():
    assert next_k(4, 4, 4, k_max=8) == 6
    assert next_k(7, 7, 7, k_max=8) == 8
    assert next_k(4, 4, 1, k_max=8) == 3
    assert next_k(1, 2, 0, k_max=8) == 1
    assert next_k(4, 4, 3, k_max=8) == 4
    assert next_k(4, 0, 0, k_max=8) == 4


# ---------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_value_error():
    target = tiny_model(40, seed=0)
    engine = Engine(target, None, torch.device("cpu"), torch.float32)
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="k=0 is invalid"):
        speculative_generate(engine, [[1, 2]], params, PromptLookupDrafter(), k=0)
    with pytest.raises(ValueError, match="k_max"):
        speculative_generate(engine, [[1, 2]], params, PromptLookupDrafter(), k=4, k_max=2)
    with pytest.raises(ValueError, match="vocabulary of 41 tokens but the target has 40"):
        speculative_generate(engine, [[1, 2]], params, ModelDrafter(tiny_model(41, seed=1)), k=2)
    with pytest.raises(ValueError, match="max_ngram"):
        PromptLookupDrafter(max_ngram=0)
    with pytest.raises(ValueError, match="self-draft layers"):
        self_drafter(engine, layers=[0, 5])
    with pytest.raises(ValueError, match="empty prompt"):
        speculative_generate(engine, [[]], params, PromptLookupDrafter(), k=2)
