"""Compiled decode against eager, and no recompilation when prompt length or position changes."""
import torch
import torch._dynamo

from kv import StaticKVCache
from model import ModelArgs
from sampling import SamplingParams
from scheduler import Engine

ARGS = ModelArgs(vocab_size=128, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128)


def test_compiled_decode_matches_eager_and_never_recompiles(tiny_model):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counts from earlier tests in this process are not ours
    eager = Engine(tiny_model(ARGS), None, torch.device("cpu"), torch.float32, max_seq_len=64)
    compiled = Engine(tiny_model(ARGS), None, torch.device("cpu"), torch.float32, compile=True, max_seq_len=64)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]]
    first = compiled.generate([prompts[0]], params)
    graphs_after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # the layers (one graph for all of them, as a CPU gets), the embedding and the head: once for every step
    assert graphs_after_first == 3

    # other prompt lengths, other positions, a batch of two: nothing new is compiled
    second = compiled.generate([prompts[1]], params)
    both = compiled.generate(prompts, params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 * graphs_after_first  # batch size 2 only
    compiled.generate([prompts[1][:7]], params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 * graphs_after_first

    assert first[0].token_ids == eager.generate([prompts[0]], params)[0].token_ids
    assert second[0].token_ids == eager.generate([prompts[1]], params)[0].token_ids
    assert [r.token_ids for r in both] == [r.token_ids for r in eager.generate(prompts, params)]


@torch.no_grad()
def test_compiled_logits_match_eager(tiny_model):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counts from earlier tests in this process are not ours
    model = tiny_model(ARGS, 1)
    tokens = torch.randint(0, 128, (2, 9))
    caches = [StaticKVCache(ARGS, 2, 32) for _ in range(2)]
    ref = [model(tokens, None, caches[0])]
    for t in range(3):
        ref.append(model(tokens[:, t:t + 1], torch.full((2, 1), 9 + t), caches[0]))
    model.compile_decode()
    out = [model(tokens, None, caches[1])]
    for t in range(3):
        out.append(model(tokens[:, t:t + 1], torch.full((2, 1), 9 + t), caches[1]))
    for a, b in zip(ref, out):
        assert (a - b).abs().max() < 1e-4
