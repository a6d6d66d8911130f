import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sampling import (  # noqa: E402
    SamplingParams,
    apply_repetition_penalty,
    chunked_argmax,
    filter_logits,
    find_stop,
    make_generator,
    row_params,
    sample,
    sample_rows,
    stop_holdback,
    stream_split,
)

from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def hf_processors(p):
    """The processor list transformers' generate(do_sample=True) builds for these params, in its order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(p.temperature)))
    if p.top_k != 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(p.min_p))
    return procs


def ours(logits, p, history=None):
    rows = row_params([p] * logits.shape[0])
    return filter_logits(logits, **rows, history=history)


def random_case(B=4, V=1000, L=30, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * scale
    history = torch.randint(0, V, (B, L), generator=g)
    return logits, history


def assert_same_distribution(a, b):
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "filtered (-inf) positions differ"
    torch.testing.assert_close(a.softmax(-1), b.softmax(-1), rtol=1e-6, atol=1e-7)


COMBOS = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=50),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_k=5000),  # larger than the vocab
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=2.0, top_p=0.01),
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=1.0, min_p=1.0),
    dict(temperature=0.6, top_k=40, top_p=0.95),
    dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.1),
    dict(temperature=1.0, repetition_penalty=1.3),
    dict(temperature=0.5, repetition_penalty=0.7, top_k=10),
    dict(temperature=1.1, repetition_penalty=1.2, top_k=100, top_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_transformers(combo, seed):
    p = SamplingParams(**combo)
    logits, history = random_case(seed=seed)
    expected = hf_processors(p)(history, logits.clone())
    got = ours(logits, p, history=history)
    assert_same_distribution(got, expected)
    # Same arithmetic as transformers, so the processed logits should even be bit-identical.
    assert torch.equal(got, expected)


@pytest.mark.parametrize("combo", COMBOS[:8], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_same_tokens_as_transformers_multinomial(combo):
    # transformers samples with torch.multinomial(softmax(scores), 1); with identical processed
    # logits and the same generator state we must draw identical tokens.
    p = SamplingParams(**combo)
    logits, history = random_case(B=16, seed=5)
    probs = hf_processors(p)(history, logits.clone()).softmax(-1)
    expected = torch.multinomial(probs, 1, generator=make_generator(123)).squeeze(1)
    got = sample(logits, p, generator=make_generator(123), history=history)
    assert torch.equal(got, expected)


def test_repetition_penalty_matches_transformers_with_padding():
    logits, history = random_case(B=3, V=200, L=12, seed=7)
    lengths = [12, 7, 1]
    padded = history.clone()
    for i, n in enumerate(lengths):
        padded[i, n:] = -1
    got = apply_repetition_penalty(logits, padded, torch.full((3,), 1.5))
    for i, n in enumerate(lengths):
        expected = RepetitionPenaltyLogitsProcessor(1.5)(history[i : i + 1, :n], logits[i : i + 1].clone())
        assert torch.equal(got[i : i + 1], expected)
    # untouched tokens are unchanged, positive seen logits shrink, negative ones grow more negative
    seen = torch.zeros(200, dtype=torch.bool)
    seen[history[0]] = True
    assert torch.equal(got[0, ~seen], logits[0, ~seen])
    before, after = logits[0, seen], got[0, seen]
    assert torch.all(torch.where(before > 0, after < before, after <= before))


def test_per_row_parameters_match_per_row_transformers():
    combos = [COMBOS[i] for i in (1, 2, 5, 8, 11, 14)]
    params = [SamplingParams(**c) for c in combos]
    logits, history = random_case(B=len(params), seed=11)
    got = filter_logits(logits, **row_params(params), history=history)
    for i, p in enumerate(params):
        expected = hf_processors(p)(history[i : i + 1], logits[i : i + 1].clone())
        assert_same_distribution(got[i : i + 1], expected)
        assert torch.equal(got[i : i + 1], expected)


def test_mixed_greedy_and_sampled_rows():
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=3), SamplingParams(repetition_penalty=2.0)]
    logits, history = random_case(B=3, seed=3)
    tok = sample_rows(logits, **row_params(params), generator=make_generator(0), history=history)
    assert tok.dtype == torch.long and tok.shape == (3,)
    assert tok[0] == logits[0].argmax()
    assert tok[1] in logits[1].topk(3).indices
    pen = RepetitionPenaltyLogitsProcessor(2.0)(history[2:3], logits[2:3].clone())
    assert tok[2] == pen.argmax()


def test_greedy_is_argmax():
    logits, history = random_case(B=8, seed=4)
    # top-k/top-p/min-p are ignored when greedy
    p = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.3)
    assert torch.equal(sample(logits, p), logits.argmax(-1))
    assert torch.equal(sample(logits, p, history=history), logits.argmax(-1))  # no penalty: history unused
    # repetition penalty still applies, as in transformers' greedy search
    p = SamplingParams(temperature=0.0, repetition_penalty=5.0)
    rows = torch.arange(8)
    logits[rows, history[:, 0]] = logits.amax(-1) + 1.0  # a seen token is each row's argmax, so the penalty matters
    expected = RepetitionPenaltyLogitsProcessor(5.0)(history, logits.clone()).argmax(-1)
    got = sample(logits, p, history=history)
    assert torch.equal(got, expected)
    assert torch.all(got != logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_argmax_is_argmax_ties_included(dtype):
    # what greedy decoding uses on a GPU for large vocabularies: same index as torch.argmax, first of ties
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 128256, generator=g).to(dtype)
    logits[0, 0, [7, 5000, 128255]] = 50.0  # a tie inside the first chunk and across chunks
    logits[1, 1] = 0.0  # every entry tied
    logits[2, 2, [128255, 128254]] = 50.0  # tie in the last chunk
    logits[3, 0, -1] = 50.0
    assert torch.equal(chunked_argmax(logits, 256), logits.argmax(-1))
    assert chunked_argmax(logits, 256)[0, 0] == 7 and chunked_argmax(logits, 256)[2, 2] == 128254


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_computed_in_fp32(dtype):
    logits, history = random_case(seed=6)
    low = logits.to(dtype)
    p = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2)
    got = ours(low, p, history=history)
    assert got.dtype == torch.float32
    assert torch.equal(got, ours(low.float(), p, history=history))
    tok = sample(low, p, generator=make_generator(1), history=history)
    assert torch.equal(tok, sample(low.float(), p, generator=make_generator(1), history=history))
    assert torch.equal(sample(low, SamplingParams()), low.float().argmax(-1))


def test_same_seed_same_samples():
    logits, _ = random_case(B=32, seed=8, scale=1.0)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    a = sample(logits, p, generator=make_generator(p.seed))
    b = sample(logits, p, generator=make_generator(p.seed))
    c = sample(logits, p, generator=make_generator(p.seed + 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert make_generator(None) is None


def test_filters_never_remove_everything():
    # tiny top_p and min_p=1 keep exactly the argmax
    logits, _ = random_case(seed=9)
    for p in (SamplingParams(temperature=1.0, top_p=1e-9), SamplingParams(temperature=1.0, min_p=1.0)):
        out = ours(logits, p)
        assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(4, dtype=torch.long))
        assert torch.equal(sample(logits, p, generator=make_generator(0)), logits.argmax(-1))


def test_filters_off_is_identity_even_when_probabilities_underflow():
    # exp(-200) underflows to 0 in fp32; a naive top_p=1 check (cum <= 0) would mask those tokens,
    # transformers doesn't run the top-p warper at all for top_p=1
    logits = torch.tensor([[0.0, -200.0, 5.0, -150.0, float("-inf")]])
    assert torch.equal(ours(logits, SamplingParams(temperature=1.0)), logits)


def test_top_k_keeps_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    out = ours(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(out).tolist() == [[False, True, True, True, False]]


@pytest.mark.parametrize(
    "combo",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.5, top_p=0.8, min_p=0.05),
     dict(temperature=1.0, repetition_penalty=1.8, top_k=6)],
    ids=["plain", "topk", "topp_minp", "reppen"],
)
def test_sampled_frequencies_follow_filtered_distribution(combo):
    p = SamplingParams(**combo)
    V, N = 8, 200_000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0]])
    history = torch.tensor([[7, 1, -1]])
    probs = ours(logits, p, history=history).softmax(-1)[0]
    tokens = sample(logits.expand(N, V), p, generator=make_generator(1234), history=history.expand(N, 3))
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[probs == 0].sum() == 0, "sampled a filtered-out token"
    keep = probs > 0
    expected = probs[keep].double() * N
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum().item()
    # 99.99th percentile of chi-square with <= 7 degrees of freedom is about 29.9
    assert chi2 < 30.0, (chi2, counts, expected)


INVALID = [
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "1"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan), ("top_p", -0.5),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", None),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("max_new_tokens", 0), ("max_new_tokens", 1.0), ("max_new_tokens", None),
    ("stop", "###"), ("stop", ["ok", ""]), ("stop", [1]), ("stop", None),
    ("seed", 1.5), ("seed", "7"),
]


@pytest.mark.parametrize("name,value", INVALID, ids=lambda x: repr(x))
def test_invalid_parameter_raises_naming_it(name, value):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{name: value})
    msg = str(e.value)
    assert name in msg and repr(value) in msg and "\n" not in msg
    # validate() also catches fields changed after construction
    p = SamplingParams()
    setattr(p, name, value)
    with pytest.raises(ValueError, match=name):
        p.validate()


def test_valid_edge_parameters():
    SamplingParams(temperature=0, top_k=0, top_p=1, min_p=0, repetition_penalty=0.01, max_new_tokens=1,
                   stop=["</s>", "\n\n"], seed=0)
    SamplingParams(temperature=1e-6, top_p=1e-6, min_p=1.0, stop=("x",), seed=2**63 - 1)


def test_sample_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(10), SamplingParams())
    with pytest.raises(ValueError, match="history"):
        sample(torch.randn(2, 10), SamplingParams(repetition_penalty=1.1), history=torch.zeros(3, 4, dtype=torch.long))


# ---- stop strings ----

def test_find_stop():
    assert find_stop("hello world", ()) is None
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("hello world", ["world"]) == 6
    assert find_stop("hello world", ["world", "lo"]) == 3  # earliest occurrence wins, not list order
    assert find_stop("ab###cd###", ["###"]) == 2
    assert find_stop("User: hi\nUser:", ["\nUser:"]) == 8
    assert find_stop("stop", ["stop"]) == 0


def test_find_stop_incremental_catches_straddling_match():
    text = "abc</s"
    assert find_stop(text, ["</s>"]) is None
    text += ">tail"
    # the new text starts at 6 but the stop string began at 3
    assert find_stop(text, ["</s>"], start=6) == 3
    # simulate streaming one character at a time: the cut is found as soon as it completes
    full, stop = "one two<|end|> three", ["<|end|>", "tw0"]
    for n in range(1, len(full) + 1):
        cut = find_stop(full[:n], stop, start=n - 1)
        if cut is not None:
            break
    assert (n, cut) == (14, 7)


def test_stop_holdback():
    assert stop_holdback("hello", ()) == 0
    assert stop_holdback("hello", ["</s>"]) == 0
    assert stop_holdback("hello<", ["</s>"]) == 1
    assert stop_holdback("hello</", ["</s>"]) == 2
    assert stop_holdback("hello</s", ["</s>"]) == 3
    assert stop_holdback("hello</s>", ["</s>"]) == 0  # a full match is find_stop's job
    assert stop_holdback("ab", ["abcdef"]) == 2  # shorter than the stop string
    assert stop_holdback("xx\n", ["\n\n", "\nUser:"]) == 1
    assert stop_holdback("x\nUs", ["\n\n", "\nUser:"]) == 3
    assert stop_holdback("aaa", ["aab"]) == 2  # longest prefix that is a suffix


def test_streaming_never_shows_part_of_a_stop_string():
    stop = ["<|im_end|>", "\n\nUser:"]
    full = "The answer is 42.<|im_e and <|im more\n\nUs text.\n\nUser: again<|im_end|>ignored"
    expected = full[: full.index("\n\nUser:")]
    shown, start = "", 0
    for n in range(1, len(full) + 1):  # one character per step; tokens would be coarser
        text = full[:n]
        safe, stopped = stream_split(text, stop, start)
        assert safe >= len(shown)  # never takes back what was shown
        assert text[:safe].startswith(shown)
        shown, start = text[:safe], n
        for s in stop:  # nothing shown ever ends in a prefix that completed into a stop string
            assert s not in shown
        if stopped:
            break
    assert stopped and shown == expected
