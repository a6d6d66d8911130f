"""Token sampling: repetition penalty, temperature, top-k, top-p, min-p, then greedy or multinomial.

The processors run in the order Hugging Face transformers' `generate` applies them, and each one does
the same arithmetic, so for fp32 logits the filtered distribution matches transformers bit for bit
(checked in tests/test_sampling.py). Everything is per-row tensors, so one call serves a batch whose
rows have different settings (continuous batching); `sample` is the single-params convenience wrapper.

Also here: stop-string helpers for cutting finished text and for holding back a streamed tail that
could turn out to be the start of a stop string.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the history
    max_new_tokens: int = 256
    stop: tuple = ()  # stop strings; the output is cut before the first one found
    seed: Optional[int] = None
    ignore_eos: bool = False  # keep generating past EOS (benchmarks want a fixed number of tokens)

    def __post_init__(self):
        self.validate()

    def validate(self):
        def bad(name, allowed):
            value = getattr(self, name)
            raise ValueError(f"sampling parameter {name}={value!r} is invalid: must be {allowed}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        # `not (a <= x)` rather than `x < a` so that NaN is rejected too
        if not is_real(self.temperature) or not (0 <= self.temperature < math.inf):
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not is_real(self.top_p) or not (0 < self.top_p <= 1):
            bad("top_p", "a number in (0, 1] (1 = off)")
        if not is_real(self.min_p) or not (0 <= self.min_p <= 1):
            bad("min_p", "a number in [0, 1] (0 = off)")
        if not is_real(self.repetition_penalty) or not (0 < self.repetition_penalty < math.inf):
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a list or tuple of non-empty strings")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "an integer or None")


def row_params(params, device=None):
    """Per-row parameter tensors for `sample_rows` from a list of SamplingParams (one per batch row)."""
    return dict(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
        # float64 so that 1 - top_p rounds exactly as transformers' Python-float arithmetic does
        top_p=torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device),
        min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
        rep_penalty=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device),
    )


def apply_repetition_penalty(logits, history, rep_penalty):
    """logits [B, V] fp32, history [B, L] token ids (negative = padding), rep_penalty [B].
    Each token seen in a row's history has its logit divided by the penalty if positive, multiplied
    if negative (once per token, however often it occurred)."""
    B, V = logits.shape
    # padding (and any id outside the vocab) goes to an extra column that is dropped afterwards
    ids = history.long().masked_fill(history < 0, V).clamp(max=V)  # [B, L]
    padded = torch.nn.functional.pad(logits, (0, 1))  # [B, V+1]
    seen = padded.gather(1, ids)  # [B, L]
    p = rep_penalty.to(logits.dtype)[:, None]
    seen = torch.where(seen < 0, seen * p, seen / p)
    return padded.scatter(1, ids, seen)[:, :V]


def warp_logits(logits, temperature, top_k, top_p, min_p):
    """Temperature, top-k, top-p, min-p on logits [B, V] fp32 -> [B, V] fp32, filtered tokens at -inf.
    temperature [B] (0 rows are treated as 1 here; `sample_rows` takes their argmax instead),
    top_k [B] long (0 = off), top_p [B] (1 = off; float64 for bit parity with transformers),
    min_p [B] (0 = off)."""
    B, V = logits.shape
    temperature = temperature.float()
    logits = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]

    # One ascending sort serves top-k and top-p; temperature > 0 does not change the order.
    sorted_logits, sorted_idx = logits.sort(dim=-1)  # [B, V]

    # top-k: drop everything below the k-th largest value (ties with it survive, as in transformers)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # [B]
    kth = sorted_logits.gather(1, (V - k)[:, None])  # [B, 1]
    remove = sorted_logits < kth  # [B, V] in sorted order

    # top-p: drop the low tail whose cumulative probability is <= 1 - top_p; the top token always stays
    cum = sorted_logits.masked_fill(remove, -math.inf).softmax(dim=-1).cumsum(dim=-1)
    cut = (1 - top_p).float()[:, None]
    remove = remove | ((cum <= cut) & (top_p < 1)[:, None])
    remove[:, -1] = False
    remove = remove.scatter(1, sorted_idx, remove)  # back to vocab order
    logits = logits.masked_fill(remove, -math.inf)

    # min-p: drop tokens whose probability is below min_p times the top token's (never the top one itself)
    probs = logits.softmax(dim=-1)
    remove = probs < min_p.float()[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, -math.inf)


def filter_logits(logits, temperature, top_k, top_p, min_p, rep_penalty, history=None):
    """The processed logits that sampling draws from: [B, V] fp32, filtered-out tokens at -inf.
    Per-row parameters as in `warp_logits`, plus rep_penalty [B] (1 = off) and history [B, L] or None."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, rep_penalty)
    return warp_logits(logits, temperature, top_k, top_p, min_p)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> the index of the largest logit per row (the first one of equal maxima, as
    torch.argmax). A GPU reduces each row of a few long rows in one thread block (27 us for V = 128k on
    an H200, half a percent of an 8B decode step): there `chunked_argmax` takes a few microseconds."""
    V = logits.shape[-1]
    if logits.device.type == "cuda" and V % 256 == 0 and V >= 16384:
        return chunked_argmax(logits, 256)
    return logits.argmax(dim=-1)


def chunked_argmax(logits: torch.Tensor, chunks: int) -> torch.Tensor:
    """torch.argmax over the last dim (V divisible by chunks) in two steps: the max of every chunk, then
    the first chunk holding the overall max, so ties resolve to the first index as torch.argmax does."""
    V = logits.shape[-1]
    best, where = logits.unflatten(-1, (chunks, V // chunks)).max(dim=-1)  # [..., chunks] each
    chunk = best.argmax(dim=-1, keepdim=True)  # [..., 1]
    return (chunk * (V // chunks) + where.gather(-1, chunk)).squeeze(-1)


def sample_rows(logits, temperature, top_k, top_p, min_p, rep_penalty, generator=None, history=None):
    """Next tokens [B] (long) for logits [B, V] with per-row parameters (see `filter_logits`).
    Rows with temperature 0 take the argmax of the repetition-penalised logits, like transformers'
    greedy search. torch.compile: compiles fullgraph with generator=None; an explicit generator makes
    dynamo break the graph at torch.multinomial (the filtering before it still compiles)."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, rep_penalty)
    probs = warp_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.where(temperature == 0, argmax(logits), sampled)


def sample(logits, params, generator=None, history=None):
    """Next tokens [B] (long) for logits [B, V] (any float dtype), all rows sharing `params`.
    history: [B, L] prompt + generated ids for the repetition penalty (-1 = padding), or None."""
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if history is not None and (history.dim() != 2 or history.shape[0] != logits.shape[0]):
        raise ValueError(f"sample: history must be [batch={logits.shape[0]}, length], got shape {tuple(history.shape)}")
    if params.repetition_penalty == 1.0:
        history = None  # nothing to do; skip the gather/scatter
    if params.temperature == 0 and history is None:
        return argmax(logits)
    rows = row_params([params] * logits.shape[0], logits.device)
    if params.temperature == 0:
        return argmax(apply_repetition_penalty(logits.float(), history, rows["rep_penalty"]))
    return sample_rows(logits, **rows, generator=generator, history=history)


def sample_each(logits, params: list, generators: list, history=None):
    """Next tokens [B] for logits [B, V] where every row has its own SamplingParams and its own
    generator (None = the global RNG): what continuous batching needs. A row with a generator draws
    exactly what `sample` draws for it alone with that generator, so a seeded request gives the same
    tokens whatever else shares its batch."""
    if all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params):
        return argmax(logits)
    rows = row_params(params, logits.device)
    logits = logits.float()
    if history is not None and any(p.repetition_penalty != 1.0 for p in params):
        logits = apply_repetition_penalty(logits, history, rows["rep_penalty"])
    out = argmax(logits)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return out
    probs = warp_logits(logits, rows["temperature"], rows["top_k"], rows["top_p"], rows["min_p"]).softmax(dim=-1)
    shared = [i for i in sampled if generators[i] is None]
    if shared:
        out[shared] = torch.multinomial(probs[shared], 1).squeeze(1)
    for i in sampled:
        if generators[i] is not None:
            out[i] = torch.multinomial(probs[i:i + 1], 1, generator=generators[i])[0, 0]
    return out


def make_generator(seed, device="cpu"):
    """A torch.Generator seeded with `seed`, or None (use the global RNG) when seed is None."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------------------------
# Stop strings. All work on the decoded text of one sequence.

def find_stop(text, stop, start=0):
    """Index where `text` must be cut (the earliest occurrence of any stop string), or None.
    `start`: where new text began since the last call; the search backs up just enough to catch a
    stop string straddling the boundary, so repeated calls during streaming stay cheap."""
    best = None
    for s in stop:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def stop_holdback(text, stop):
    """How many trailing characters of `text` to hold back from streaming because they are the start
    of some stop string (a proper prefix of it) and might complete into one with the next token."""
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def stream_split(text, stop, start=0):
    """(safe_end, stopped): text[:safe_end] may be shown now. stopped=True means a stop string was
    found, safe_end is the cut point and generation for this sequence is finished."""
    cut = find_stop(text, stop, start)
    if cut is not None:
        return cut, True
    return len(text) - stop_holdback(text, stop), False
