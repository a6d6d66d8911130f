"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them all in one forward.

    from scheduler import Engine
    from sampling import SamplingParams
    from speculative import PromptLookupDrafter, ModelDrafter, speculative_generate
    engine = Engine.load()
    results, stats = speculative_generate(engine, ["Repeat: ..."], SamplingParams(max_new_tokens=200),
                                          PromptLookupDrafter(), k=8)
    print(results[0].text, stats.summary())

One round, per row of the batch (rows run at their own positions, as in kv.py):
  1. the drafter proposes up to k tokens d1..dk (and, if it samples, its distributions q1..qk);
  2. the target runs ONE forward over [last, d1..dk] (k+1 tokens) and gets p1..p(k+1);
  3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), in order; at the first rejection the
     row takes a token from normalize(max(0, p_i - q_i)); if all k were accepted it takes a bonus
     token from p(k+1). So a round yields 1..k+1 tokens, and the output follows the target's
     distribution exactly (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
     Decoding", Appendix A). p and q are the *processed* distributions (repetition penalty,
     temperature, top-k, top-p, min-p; sampling.filter_logits) under the same SamplingParams.
     Greedy is the special case of one-hot p: keep drafts while they equal the target's argmax.
     Deterministic drafters (prompt lookup, greedy drafting) have a one-hot q.
  4. Rollback is free: a StaticKVCache masks keys at positions after the query, so the keys the target
     wrote for rejected drafts are invisible and the next round simply writes over them, starting at
     the row's true length. A draft model's cache is rolled back the same way (ModelDrafter keeps the
     list of tokens it has fed and drops the ones that turned out wrong).

Drafters (duck-typed; each has start(engine, prompt_ids, cache_len) and propose(...), see below):
  PromptLookupDrafter  n-gram match in prompt + output so far, no extra model (input-grounded tasks)
  ModelDrafter         a separate small model sharing the tokenizer, with its own KV cache
  self_drafter(...)    self-speculation: ModelDrafter over a layer-skipping view of the target
                       (or any cheaper copy of it, e.g. an int4 copy from quantize.py)
"""
import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from kv import StaticKVCache
from model import Transformer
from sampling import SamplingParams, apply_repetition_penalty, argmax, make_generator, row_params, sample, warp_logits
from scheduler import GraphedForward, Metrics, Result, Sequence, drain, peak_memory_bytes
from tokenizer import StreamDecoder


# ---------------------------------------------------------------- processed distributions

def processed_logits(logits, params: SamplingParams, history=None):
    """logits [N, V] -> the logits whose softmax (or argmax, when greedy) is what the engine samples from.
    history [N, L] (-1 = padding) feeds the repetition penalty; None when it is off."""
    logits = logits.float()
    if history is not None and params.repetition_penalty != 1.0:
        rows = row_params([params] * logits.shape[0], logits.device)
        logits = apply_repetition_penalty(logits, history, rows["rep_penalty"])
    if params.temperature == 0:
        return logits
    rows = row_params([params] * logits.shape[0], logits.device)
    return warp_logits(logits, rows["temperature"], rows["top_k"], rows["top_p"], rows["min_p"])


def history_tensor(histories: list[list[int]], device, extra: int = 0) -> torch.Tensor:
    """Token lists -> [B, longest + extra] long, -1 padded (the repetition penalty's history)."""
    out = torch.full((len(histories), max(map(len, histories)) + extra), -1, dtype=torch.long)
    for b, h in enumerate(histories):
        out[b, : len(h)] = torch.tensor(h, dtype=torch.long)
    return out.to(device)


def histories_with_drafts(history, drafts):
    """history [B, L], drafts [B, D] -> [B * (D+1), L + D]: position j of row b sees the row's tokens
    plus its first j drafts (the history each verified position would have had when sampled)."""
    B, D = drafts.shape
    seen = torch.arange(D, device=drafts.device) < torch.arange(D + 1, device=drafts.device)[:, None]  # [D+1, D]
    tail = torch.where(seen, drafts[:, None, :], -1)  # [B, D+1, D]
    head = history[:, None, :].expand(B, D + 1, history.shape[1])
    return torch.cat([head, tail], dim=-1).reshape(B * (D + 1), -1)


# ---------------------------------------------------------------- verification

def accept_greedy(target: list[list[int]], drafts: list[list[int]]) -> tuple[list[int], list[int]]:
    """target: per row, the argmax tokens of the processed target logits at each verified position
    (at least len(drafts[b]) + 1 of them); drafts: per row, its drafts.
    -> accepted (leading drafts equal to the target's choice), next token (the target's choice right
    after them: the correction, or the bonus token when every draft was accepted), per row.
    On the host: one small copy of the argmax tokens costs less than a chain of tiny device kernels."""
    accepted = []
    for t, d in zip(target, drafts):
        a = 0
        while a < len(d) and d[a] == t[a]:
            a += 1
        accepted.append(a)
    return accepted, [t[a] for t, a in zip(target, accepted)]


def accept_sampled(p, q, drafts, n_drafts, generator=None):
    """Rejection sampling. p [B, T, V] target probabilities at the T = D+1 verified positions,
    q [B, D, V] the drafter's probabilities for its drafts, or None for a deterministic drafter
    (q = one-hot at the draft), drafts [B, D], n_drafts [B].
    -> accepted [B], next token [B], distributed so that the tokens follow p exactly."""
    B, T, V = p.shape
    D = T - 1
    rows = torch.arange(B, device=p.device)
    valid = torch.arange(D, device=p.device) < n_drafts[:, None]  # [B, D]
    p_x = p[:, :D].gather(2, drafts[..., None]).squeeze(2)  # [B, D] target prob of each draft
    q_x = q.gather(2, drafts[..., None]).squeeze(2) if q is not None else torch.ones_like(p_x)
    u = torch.rand(B, D, device=p.device, generator=generator)
    ok = (u * q_x < p_x) & valid  # u < p/q without dividing by a q that could underflow
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [B]

    # the next token: from p at position `accepted` if every draft was taken, else from max(0, p - q)
    p_a = p[rows, accepted]  # [B, V]
    rejected = accepted < n_drafts
    if D > 0:
        at = accepted.clamp(max=D - 1)
        if q is not None:
            residual = (p_a - q[rows, at]).clamp(min=0)
        else:
            residual = p_a.scatter(1, drafts[rows, at][:, None], 0.0)  # p minus the one-hot, clamped
        # a residual with no mass means p <= q everywhere, i.e. p == q: then p itself is right
        residual = torch.where(residual.sum(1, keepdim=True) > 0, residual, p_a)
        p_a = torch.where(rejected[:, None], residual, p_a)
    nxt = torch.multinomial(p_a, 1, generator=generator).squeeze(1)  # multinomial normalises
    return accepted, nxt


# ---------------------------------------------------------------- drafters

class PromptLookupDrafter:
    """Prompt lookup (n-gram) drafting: find the row's last n tokens earlier in its prompt + output
    (n = max_ngram down to min_ngram; the earliest occurrence, as transformers does) and propose the
    tokens that followed. No model; q is one-hot. Shines when the output copies the input."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (isinstance(max_ngram, int) and isinstance(min_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"prompt lookup n-gram sizes min_ngram={min_ngram!r}, max_ngram={max_ngram!r} are "
                             f"invalid: need integers with 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = "prompt lookup"

    def start(self, engine, prompt_ids: list[list[int]], cache_len: int):
        # per row: n-gram tuple -> where its earliest occurrence starts, and how many tokens are indexed
        self.index = [{} for _ in prompt_ids]
        self.indexed = [0] * len(prompt_ids)

    def _update(self, b: int, h: list[int]):
        index = self.index[b]
        for end in range(self.indexed[b] + 1, len(h) + 1):  # n-grams ending at h[end-1]
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                index.setdefault(tuple(h[end - n: end]), end - n)
        self.indexed[b] = len(h)

    def propose(self, histories: list[list[int]], n: list[int], params: SamplingParams, generator=None):
        """histories: each row's tokens so far (prompt + accepted output); n: the most drafts each row
        may have. -> (drafts: one list per row, at most n[b] long; None: q is one-hot)."""
        drafts = []
        for b, h in enumerate(histories):
            self._update(b, h)
            found = []
            for size in range(min(self.max_ngram, len(h)), self.min_ngram - 1, -1):
                start = self.index[b].get(tuple(h[-size:]))
                if start is not None and start + size < len(h):  # not just the suffix itself
                    found = h[start + size: start + size + n[b]]
                    break
            drafts.append(found if n[b] > 0 else [])
        return drafts, None


class ModelDrafter:
    """A small model sharing the target's tokenizer drafts autoregressively with its own KV cache.
    It remembers which tokens it has fed each row; tokens the target rejected are dropped from that
    list and their cache slots are simply overwritten later (rollback is free, as for the target)."""

    def __init__(self, model: nn.Module, name: str = "draft model"):
        self.model, self.name = model, name
        self.args = model.args

    def start(self, engine, prompt_ids: list[list[int]], cache_len: int):
        if self.args.vocab_size != engine.args.vocab_size:
            raise ValueError(f"{self.name} has a vocabulary of {self.args.vocab_size} tokens but the target has "
                             f"{engine.args.vocab_size}: a draft model must share the target's tokenizer")
        p = next(self.model.parameters())
        B = len(prompt_ids)
        self.device = p.device
        # A compiled CUDA engine drafts with CUDA graphs too: one graph per step shape.
        graphs = engine.cuda_graphs
        if graphs and not self.model.compiled_decode:
            self.model.compile_decode()
        # room past the longest row for the catch-up forward's padding (a power of two <= 2 * (K_LIMIT + 1)),
        # in a multiple of 64 slots (attention kernels want aligned key lengths for their masks)
        need = 64 * math.ceil((cache_len + 2 * (K_LIMIT + 1)) / 64)
        c = getattr(self, "cache", None)
        if c is None or c.batch_size != B or c.max_seq_len < need or self.forward.use_graphs != graphs:
            self.cache = self.forward = None  # free the old cache and its graphs first
            self.cache = self.make_cache(B, need, p.device, p.dtype)
            self.forward = GraphedForward(self.model, self.cache, p.device, graphs)
        self.fed = [[] for _ in range(B)]  # the tokens whose keys are in the cache, per row

    def make_cache(self, batch, seq_len, device, dtype):
        return StaticKVCache(self.args, batch, seq_len, device, dtype)

    def _logits(self, tokens, pos, last):
        """tokens, pos [B, T], last [B]: index of each row's last real token -> its logits [B, V]."""
        if pos is None:  # every row from position 0: a plain prefill
            return self.model(tokens, None, self.cache, logits_at=last)[:, 0]
        if not self.model.compiled_decode:  # a compiled step wants one kv_len
            self.cache.attend_upto(int(pos.max()) + 1)
        if self.forward.use_graphs and tokens.shape[1] > 1:  # pad to a power of two: few graphs
            pad = (1 << (tokens.shape[1] - 1).bit_length()) - tokens.shape[1]
            tokens = F.pad(tokens, (0, pad))
            pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, pad + 1, device=pos.device)], dim=1)
        logits = self.forward(tokens, pos)  # [B, T, V]
        return logits[torch.arange(len(last), device=logits.device), last]

    @torch.inference_mode()
    def propose(self, histories: list[list[int]], n: list[int], params: SamplingParams, generator=None):
        """-> (drafts: one list per row with exactly n[b] tokens, q [B, max(n), V] probabilities or None
        when drafting greedily (q one-hot)). Drafting takes max(n) forwards of the draft model."""
        B, steps = len(histories), max(n)
        if steps == 0:
            return [[] for _ in histories], None
        # catch up: drop fed tokens the target rejected, then feed what is new (at least the last token)
        todo = []
        for b, h in enumerate(histories):
            fed = self.fed[b]
            keep = 0
            while keep < min(len(fed), len(h) - 1) and fed[keep] == h[keep]:
                keep += 1
            del fed[keep:]
            todo.append(h[keep:])
        T = max(map(len, todo))
        tokens = torch.zeros(B, T, dtype=torch.long)
        for b, t in enumerate(todo):
            tokens[b, : len(t)] = torch.tensor(t)
        start = torch.tensor([len(f) for f in self.fed])
        pos = (start[:, None] + torch.arange(T)).to(self.device)  # padding lands past each row's end
        n_new = torch.tensor([len(t) for t in todo], device=self.device)
        fresh = not any(self.fed)  # the first round: every row from position 0
        logits = self._logits(tokens.to(self.device), None if fresh else pos, n_new - 1)  # [B, V]
        for b, t in enumerate(todo):
            self.fed[b].extend(t)

        penalty = params.repetition_penalty != 1.0
        history = history_tensor(histories, self.device, extra=steps) if penalty else None
        lengths = torch.tensor([len(h) for h in histories], device=self.device)
        rows = torch.arange(B, device=self.device)
        drafts, qs = [], []
        for i in range(steps):
            x = processed_logits(logits, params, history)
            if params.temperature == 0:
                d = argmax(x)
            else:
                q = x.softmax(dim=-1)
                d = torch.multinomial(q, 1, generator=generator).squeeze(1)
                qs.append(q)
            drafts.append(d)
            if penalty:
                history[rows, lengths + i] = d
            if i + 1 < steps:  # the last draft is not fed: it is verified (and fed) next round if kept
                cur = (lengths + i)[:, None]
                logits = self._logits(d[:, None], cur, rows * 0)
        drafts = torch.stack(drafts, dim=1).tolist()  # [B, steps]
        for b in range(B):
            self.fed[b].extend(drafts[b][: steps - 1])
        q = torch.stack(qs, dim=1) if qs else None
        return [d[: n[b]] for b, d in enumerate(drafts)], q


def layer_skip_model(target: Transformer, keep: list[int]) -> Transformer:
    """A Transformer that runs only the layers `keep` of `target`: the very same modules and weight
    tensors (nothing is copied), with args.n_layers = len(keep) so it gets its own, smaller cache.
    Self-speculation's draft."""
    n = target.args.n_layers
    keep = list(keep)
    if not keep or any(not (isinstance(i, int) and 0 <= i < n) for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"self-draft layers {keep} are invalid: need distinct layer indices in 0..{n - 1}")
    keep = sorted(keep)
    with torch.device("meta"):  # a skeleton; every module in it is replaced by the target's own
        model = Transformer(replace(target.args, n_layers=len(keep)))
    model.embed_tokens, model.norm, model.lm_head = target.embed_tokens, target.norm, target.lm_head
    model.layers = nn.ModuleList(target.layers[i] for i in keep)
    model.inv_freq, model.rope_factor = target.inv_freq, target.rope_factor
    model.decode_block = target.decode_block  # a compiled block works for any layer
    model.decode_layers = target.decode_layers  # (the whole-model one compiles once more for fewer layers)
    model.keep, model.target_args = keep, target.args
    return model.eval()


class LayerSkipDrafter(ModelDrafter):
    def make_cache(self, batch, seq_len, device, dtype):
        cache = StaticKVCache(self.args, batch, seq_len, device, dtype)
        for j, i in enumerate(self.model.keep):  # sliding-window layers keep their own setting
            cache.layers[j].windowed = self.model.target_args.uses_window(i)
        return cache


def default_skip_layers(n_layers: int) -> list[int]:
    """Layers a self-draft keeps by default: all of the first half and the last two, every other one
    in between (middle-to-late layers change the residual stream least; Draft & Verify, SWIFT).
    Untrained layer skipping needs a big model: on SmolLM2-135M (30 layers) this keeps 23 and ~20% of
    drafts are accepted on a copy task (0.55x target-only speed on CPU); dropping only the last layer
    gets ~50% but saves nothing. An int4 copy (self_drafter(engine, model=...)) is accepted ~80%."""
    return [i for i in range(n_layers) if i < n_layers // 2 or i >= n_layers - 2 or i % 2 == 0]


def self_drafter(engine, layers: list[int] | None = None, model: nn.Module | None = None):
    """Self-speculation with a cheaper copy of the target.
    layers: which target layers the draft keeps (default: default_skip_layers), sharing the weights.
    model: any cheaper model of the target's vocabulary instead, e.g. an int4 copy from quantize.py
    (HOOK: `self_drafter(engine, model=quantize.quantize_model(copy.deepcopy(engine.model), "int4"))`).
    Either way the draft has its own KV cache and shares nothing mutable with the target's."""
    if model is not None:
        return ModelDrafter(model, name="self-draft model")
    keep = default_skip_layers(engine.args.n_layers) if layers is None else list(layers)
    return LayerSkipDrafter(layer_skip_model(engine.model, keep), name="self-draft")


# ---------------------------------------------------------------- adaptive k

def next_k(k: int, drafted: int, accepted: int, k_max: int) -> int:
    """Adaptive draft length: +2 after a round that accepted everything, -1 when under half was kept
    (the rule transformers uses for assisted generation), within [1, k_max]."""
    if drafted == 0:
        return k
    if accepted == drafted:
        return min(k + 2, k_max)
    if accepted < drafted / 2:
        return max(k - 1, 1)
    return k


# ---------------------------------------------------------------- generation

@dataclass
class SpecStats:
    rounds: int = 0  # target verify forwards
    drafted: int = 0  # draft tokens proposed to the target (all rows)
    accepted: int = 0  # of those, accepted
    emitted: int = 0  # tokens appended to the outputs by the rounds (accepted + corrections/bonuses)
    row_rounds: int = 0  # sum over rounds of the rows still running
    draft_s: float = 0.0  # time spent drafting
    verify_s: float = 0.0  # time spent in target forwards + acceptance
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0  # first token to the end (as Metrics.decode_s)
    k_trace: list = field(default_factory=list)  # k used by each round

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """Tokens a row gains per round (accepted drafts + the target's own token), averaged."""
        return self.emitted / self.row_rounds if self.row_rounds else 0.0

    @property
    def round_ms(self) -> float:
        return 1000 * (self.draft_s + self.verify_s) / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "k_trace"}
        d.update(acceptance_rate=self.acceptance_rate, mean_accepted_len=self.mean_accepted_len,
                 round_ms=self.round_ms, mean_k=sum(self.k_trace) / len(self.k_trace) if self.k_trace else 0.0)
        return d

    def summary(self) -> str:
        return (f"speculative: {self.rounds} rounds, acceptance {self.acceptance_rate:.1%} "
                f"({self.accepted}/{self.drafted}), {self.mean_accepted_len:.2f} tokens/round/row, "
                f"{self.round_ms:.1f} ms/round (draft {self.draft_s:.2f} s, verify {self.verify_s:.2f} s)")


K_LIMIT = 64  # most drafts per round


def check_k(k, k_max):
    if not isinstance(k, int) or isinstance(k, bool) or not (1 <= k <= K_LIMIT):
        raise ValueError(f"speculate k={k!r} is invalid: must be an integer in 1..{K_LIMIT}")
    if k_max is not None and (not isinstance(k_max, int) or isinstance(k_max, bool) or not (k <= k_max <= K_LIMIT)):
        raise ValueError(f"speculate k_max={k_max!r} is invalid: must be an integer in k ({k})..{K_LIMIT}")


def iter_speculative_generate(engine, prompts, params: SamplingParams | None, drafter, k: int = 5,
                              adaptive: bool = True, k_max: int | None = None, chat: bool = False):
    """Like Engine.iter_generate: yields (row, text_piece); its return value is (Results, SpecStats).
    Also sets engine.metrics (a scheduler.Metrics, with the speculative stats in .extra) so the
    engine's usual summary line works."""
    check_k(k, k_max)
    k_max = k_max if k_max is not None else (min(2 * k, K_LIMIT) if adaptive else k)
    params = params or SamplingParams()
    tok = engine.tokenizer
    seqs = [Sequence(engine.encode(p, chat), StreamDecoder(tok) if tok else None, params.stop) for p in prompts]
    stats = SpecStats()
    for got in _spec_steps(engine, seqs, params, drafter, k, adaptive, k_max, stats):
        for b in got:
            if piece := seqs[b].take_text():
                yield b, piece
    results = [Result(p, s.text, s.token_ids, s.finish_reason, len(s.prompt_ids)) for p, s in zip(prompts, seqs)]
    return results, stats


def speculative_generate(engine, prompts, params: SamplingParams | None, drafter, k: int = 5,
                         adaptive: bool = True, k_max: int | None = None, chat: bool = False, on_text=None):
    """Generates for a batch of prompts (strings, token-id lists, or message lists with chat=True) with
    speculative decoding. -> (list of scheduler.Result (token_ids, text, finish_reason), SpecStats).
    Greedy output is token for token the engine's; sampled output follows the same distribution.
    k: drafts per round to start with; adaptive: let k follow the acceptance within [1, k_max]
    (k_max default 2k); on_text(row, piece) streams text as Engine.generate does."""
    return drain(iter_speculative_generate(engine, prompts, params, drafter, k, adaptive, k_max, chat), on_text)


@torch.inference_mode()
def _spec_steps(engine, seqs: list[Sequence], params: SamplingParams, drafter, k: int, adaptive: bool,
                k_max: int, stats: SpecStats):
    """The speculative loop: prefill, then rounds of draft + verify. Yields the rows that got tokens."""
    B = len(seqs)
    lens = [len(s.prompt_ids) for s in seqs]
    longest, max_new = engine.fit(lens, params.max_new_tokens)
    dev = engine.device
    # The engine's own cache and step: verification is a decode step of k + 1 tokens per row. Real
    # drafts never pass a row's max_new, so they fit; on a compiled CUDA engine each verify shape is a
    # CUDA graph, and the drafts are padded to a power of two (few shapes) where the cache has room.
    compiled = engine.compiled
    graphs = engine.cuda_graphs
    cache = engine._cache_for(B, longest + max_new)
    cache_len = cache.max_seq_len
    generator = make_generator(params.seed, dev)
    histories = [list(s.prompt_ids) for s in seqs]  # prompt + output so far (EOS included), per row
    drafter.start(engine, histories, cache_len)
    penalty = params.repetition_penalty != 1.0
    eos = set() if params.ignore_eos or engine.tokenizer is None else engine.tokenizer.eos_ids

    m = engine.metrics = Metrics(batch_size=B, prompt_tokens=sum(lens), weight_bytes=engine.weight_bytes,
                                 weight_bytes_per_step=engine.weight_bytes_per_step, kv_cache_bytes=cache.nbytes)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()

    # prefill exactly as the engine does (same shapes, so the first token is the engine's)
    if not compiled:
        cache.attend_upto(longest)
    tokens = torch.zeros(B, longest, dtype=torch.long)
    for b, ids in enumerate(histories):
        tokens[b, : len(ids)] = torch.tensor(ids)
    tokens = tokens.to(dev)
    logits = engine.model(tokens, None, cache, logits_at=torch.tensor(lens, device=dev) - 1)[:, 0]  # None: from 0
    first = sample(logits, params, generator, history_tensor(histories, dev) if penalty else None).tolist()
    n_gen = [0] * B

    def emit(b, new_tokens):  # append a row's new tokens, stopping at EOS, a stop string or the length
        s = seqs[b]
        for t in new_tokens:
            histories[b].append(t)
            n_gen[b] += 1
            s.append(t, t in eos)
            if s.finish_reason is None and n_gen[b] >= max_new:
                s.finish("length")
            if s.finish_reason is not None:
                return

    t_first = time.perf_counter()
    m.ttft_s = stats.prefill_s = t_first - t0
    for b in range(B):
        emit(b, [first[b]])
    yield list(range(B))

    while any(s.finish_reason is None for s in seqs):
        live = [s.finish_reason is None for s in seqs]
        # the last draft position must leave room for the target's own token within max_new
        n = [min(k, max_new - n_gen[b] - 1) if live[b] else 0 for b in range(B)]
        t = time.perf_counter()
        drafts, q = drafter.propose(histories, n, params, generator)
        n = [len(d) for d in drafts]
        D = max(n)
        t_draft = time.perf_counter()

        # verify: [last, d1..dD] per row at its own positions, in one target forward
        if graphs and D > 0 and max(map(len, histories)) + (1 << (D - 1).bit_length()) <= cache_len:
            D = 1 << (D - 1).bit_length()  # padding drafts: past n[b], never accepted
            q = F.pad(q, (0, 0, 0, D - q.shape[1])) if q is not None else None
        T = D + 1
        tokens = torch.zeros(B, T, dtype=torch.long)
        for b, (h, d) in enumerate(zip(histories, drafts)):
            tokens[b, : len(d) + 1] = torch.tensor(h[-1:] + d, dtype=torch.long)
        start = torch.tensor([len(h) - 1 for h in histories])
        pos = start[:, None] + torch.arange(T)  # [B, T]
        tokens, pos = tokens.to(dev), pos.to(dev)
        draft_t = tokens[:, 1:]  # [B, D]
        if not compiled:
            cache.attend_upto(int(pos.max()) + 1)
        logits = engine.decode_forward(tokens, pos, cache)  # [B, T, V]
        m.kv_read_bytes += cache.nbytes * cache.kv_len // cache.max_seq_len
        hist = histories_with_drafts(history_tensor(histories, dev), draft_t) if penalty else None
        x = processed_logits(logits.reshape(B * T, -1), params, hist).view(B, T, -1)
        if params.temperature == 0:
            accepted, nxt = accept_greedy(argmax(x).tolist(), drafts)
        else:
            accepted, nxt = accept_sampled(x.softmax(dim=-1), q, draft_t, torch.tensor(n, device=dev), generator)
            accepted, nxt = torch.stack([accepted, nxt]).tolist()  # one copy to the host
        t_verify = time.perf_counter()

        got = []
        for b in range(B):
            if not live[b]:
                continue
            stats.row_rounds += 1
            stats.drafted += n[b]
            stats.accepted += accepted[b]
            before = n_gen[b]
            emit(b, drafts[b][: accepted[b]] + [nxt[b]])
            stats.emitted += n_gen[b] - before
            got.append(b)
        stats.rounds += 1
        stats.k_trace.append(k)
        stats.draft_s += t_draft - t
        stats.verify_s += t_verify - t_draft
        if adaptive:
            k = next_k(k, sum(n[b] for b in got), sum(accepted[b] for b in got), k_max)
        m.decode_steps += 1
        yield got

    m.new_tokens = stats.new_tokens = sum(n_gen)
    m.decode_s = stats.decode_s = time.perf_counter() - t_first
    m.decode_tok_per_s = (m.new_tokens - B) / m.decode_s if m.decode_s > 0 else 0.0
    m.peak_memory_bytes = peak_memory_bytes(dev)
    m.extra = stats.as_dict()


# ---------------------------------------------------------------- measurement (bench.py calls this)

PASSAGE = (
    "The Great Barrier Reef is the worlds largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
    "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
    "from outer space and is the world's biggest single structure made by living organisms. This reef "
    "structure is composed of and built by billions of tiny organisms, known as coral polyps. It supports a "
    "wide diversity of life and was selected as a World Heritage Site in 1981. CNN labelled it one of the "
    "seven natural wonders of the world in 1997. Australian World Heritage places included it in its list "
    "in 2007. The Queensland National Trust named it a state icon of Queensland in 2006. A large part of "
    "the reef is protected by the Great Barrier Reef Marine Park, which helps to limit the impact of human "
    "use, such as fishing and tourism. Other environmental pressures on the reef and its ecosystem include "
    "runoff of humanmade pollutants, climate change accompanied by mass coral bleaching, dumping of dredging "
    "sludge and cyclic population outbreaks of the crown-of-thorns starfish. According to a study published "
    "in October 2012 by the Proceedings of the National Academy of Sciences, the reef has lost more than "
    "half its coral cover since 1985.")
EDIT_TASK = [{"role": "user", "content": "Repeat the following passage exactly, word for word, but write "
                                         "\"world's\" instead of \"worlds\" and \"human-made\" instead of "
                                         "\"humanmade\":\n\n" + PASSAGE}]


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_speculative(engine, drafter, prompts=None, k: int = 8, adaptive: bool = True, k_max: int | None = None,
                      new_tokens: int = 400, repeats: int = 2, chat: bool = True, hf_reference: bool = False,
                      hf_num_tokens: int = 10) -> dict:
    """Target-only vs speculative greedy decoding on the same prompts in the same run.
    prompts: default the input-grounded EDIT_TASK (copy a ~300-token passage with two corrections).
    Checks that both produce the same tokens; the best of `repeats` runs of each counts.
    tok/s = generated tokens / wall time of the whole generate call (prefill included);
    decode_tok_per_s = Engine.metrics' definition (tokens after the first / time after the first).
    hf_reference: also time transformers' own prompt-lookup decoding (prompt_lookup_num_tokens) on
    the same weights (batch 1 only)."""
    prompts = prompts or [EDIT_TASK]
    params = SamplingParams(max_new_tokens=new_tokens)
    ids = [engine.encode(p, chat) for p in prompts]
    # warm-up at full length: every step shape the timed runs meet is compiled (and captured) here
    engine.generate(ids, params)
    speculative_generate(engine, ids, params, drafter, k=k, adaptive=adaptive, k_max=k_max)
    base_runs, spec_runs = [], []
    for _ in range(repeats):
        results, wall = _timed(lambda: engine.generate(ids, params))
        base_runs.append((wall, engine.metrics.decode_tok_per_s, results))
        (spec_results, stats), wall = _timed(
            lambda: speculative_generate(engine, ids, params, drafter, k=k, adaptive=adaptive, k_max=k_max))
        spec_runs.append((wall, engine.metrics.decode_tok_per_s, spec_results, stats))
    base = min(base_runs, key=lambda r: r[0])
    spec = min(spec_runs, key=lambda r: r[0])
    n_tokens = sum(len(r.token_ids) + (r.finish_reason == "eos") for r in base[2])
    stats = spec[3]
    row = {
        "bench": "speculative", "drafter": getattr(drafter, "name", type(drafter).__name__), "k": k, "adaptive": adaptive,
        "batch_size": len(ids), "prompt_tokens": sum(map(len, ids)), "new_tokens": n_tokens,
        "identical_output": all(a.token_ids == b.token_ids for a, b in zip(base[2], spec[2])),
        # whether target-only decoding repeats itself: on random weights (near-flat logits) a rounding
        # difference flips an argmax, and then no two code paths can be expected to agree
        "target_runs_identical": all([r.token_ids for r in run[2]] == [r.token_ids for r in base[2]] for run in base_runs),
        "target_tok_per_s": n_tokens / base[0], "spec_tok_per_s": n_tokens / spec[0],
        "speedup": base[0] / spec[0],
        "target_decode_tok_per_s": base[1], "spec_decode_tok_per_s": spec[1],
        "acceptance_rate": stats.acceptance_rate, "mean_accepted_len": stats.mean_accepted_len,
        "rounds": stats.rounds, "round_ms": stats.round_ms, "mean_k": stats.as_dict()["mean_k"],
        "draft_ms_per_round": 1000 * stats.draft_s / max(stats.rounds, 1),
        "verify_ms_per_round": 1000 * stats.verify_s / max(stats.rounds, 1),
        # what a round costs against one target-only decode step (a round that rejects everything
        # yields one token, so this is the slowdown at zero acceptance)
        "target_step_ms": 1000 / base[1] if base[1] else None,
        "round_vs_target_step": stats.round_ms * base[1] / 1000 if base[1] else None,
        "draft_s": stats.draft_s, "verify_s": stats.verify_s, "threads": torch.get_num_threads(),
    }
    if hf_reference and len(ids) == 1:
        row.update(hf_prompt_lookup(engine, ids[0], new_tokens, hf_num_tokens, base[2][0].token_ids, repeats))
        row["speedup_vs_hf_prompt_lookup"] = row["spec_tok_per_s"] / row["hf_pld_tok_per_s"]
    return row


def hf_prompt_lookup(engine, prompt_ids: list[int], new_tokens: int, num_tokens: int = 10, expect=None,
                     repeats: int = 2) -> dict:
    """transformers on the same weights: plain greedy and prompt-lookup greedy (prompt_lookup_num_tokens)."""
    from weights import transformers_model

    ref = transformers_model(engine.model)
    x = torch.tensor([prompt_ids], device=engine.device)
    eos = sorted(engine.tokenizer.eos_ids) if engine.tokenizer else None
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              eos_token_id=eos)
    out = {}
    for name, extra in (("hf_plain", {}), ("hf_pld", {"prompt_lookup_num_tokens": num_tokens})):
        best = None
        for _ in range(repeats):
            with torch.inference_mode():
                ids, wall = _timed(lambda: ref.generate(x, **kw, **extra)[0, x.shape[1]:].tolist())
            best = wall if best is None else min(best, wall)
        if ids and eos and ids[-1] in eos:
            ids = ids[:-1]
        out[f"{name}_tok_per_s"] = (len(ids) + (len(ids) < new_tokens)) / best
        if expect is not None:
            out[f"{name}_same_output"] = ids == expect
    return out
