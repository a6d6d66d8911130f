"""The engine: requests in, tokens out. Every front door (generate.py, chat_app.py, server.py, bench.py)
drives this one Engine, so there is one generation loop in the project.

    from scheduler import Engine
    from sampling import SamplingParams
    engine = Engine.load()                                  # the embedded SmolLM2-135M-Instruct
    [out] = engine.generate(["The capital of France is"], SamplingParams(max_new_tokens=20))
    print(out.text)
    for piece in engine.stream("Tell me a joke", SamplingParams(temperature=0.7), chat=True):
        print(piece, end="", flush=True)

Static batching: a batch of prompts of different lengths is right-padded and every row runs at its own
positions (see kv.py), so each row's tokens equal what it would get alone. Rows that finish early keep
their slot until the whole batch is done.
"""
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from kv import StaticKVCache
from quantize import load_quantized, model_bytes, quantize_model, quantized_from_gguf
from sampling import SamplingParams, find_stop, make_generator, sample, stop_holdback
from tokenizer import StreamDecoder, load_tokenizer
from weights import default_model_path, load_model


@dataclass
class Result:
    prompt: str | list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int = 0


@dataclass
class Metrics:
    """Timings of the last generate() call (seconds, tokens/s, bytes)."""
    batch_size: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tok_per_s: float = 0.0  # generated tokens of all rows per second of decoding
    weight_bytes: int = 0
    weight_bytes_per_step: int = 0  # what one decode step reads (the embedding table but one row excluded)
    kv_cache_bytes: int = 0
    kv_read_bytes: int = 0  # KV bytes the decode steps attended over
    peak_memory_bytes: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        gb_s = (self.weight_bytes_per_step * self.decode_steps + self.kv_read_bytes) / max(self.decode_s, 1e-9) / 1e9
        return (f"TTFT {self.ttft_s * 1000:.0f} ms | decode {self.decode_tok_per_s:.1f} tok/s "
                f"({self.batch_size} x {self.decode_steps} steps, ~{gb_s:.1f} GB/s) | "
                f"peak memory {self.peak_memory_bytes / 1e9:.2f} GB")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def drain(it, on_text=None):
    """Runs a generation iterator (yielding (row, text_piece), returning its results) to the end."""
    while True:
        try:
            row, piece = next(it)
        except StopIteration as done:
            return done.value
        if on_text is not None:
            on_text(row, piece)


def is_quantized_dir(source) -> bool:
    """A directory written by quantize.py (config.json carries flint's quantization_config)."""
    config = os.path.join(os.fspath(source), "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return (json.load(f).get("quantization_config") or {}).get("quant_method") == "flint"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource  # host: the process's peak resident set, in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Engine:
    def __init__(self, model, tokenizer, device, dtype, compile: bool = False, max_seq_len: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.args = model.args
        self.device, self.dtype = device, dtype
        self.max_seq_len = min(max_seq_len or self.args.max_seq_len, self.args.max_seq_len)
        self.cache: StaticKVCache | None = None
        self.metrics = Metrics()
        self.compiled = compile
        self._graph = None  # the captured CUDA graph of one decode step (compiled decode on CUDA)
        if compile:
            # Decode has static shapes ([B, 1] tokens over a fixed-size cache): one compiled block
            # serves every layer, every step and every prompt length. On CUDA the whole step is then
            # captured in a CUDA graph by hand, so a token costs one graph launch.
            self.model.compile_decode()
        # bytes of weights one decode step reads: everything but the embedding table, of which a
        # step reads one row (unless it is tied to the lm head, which reads all of it)
        self.weight_bytes = model_bytes(model)  # parameters and quantized buffers, shared ones once
        self.weight_bytes_per_step = self.weight_bytes
        if not self.args.tie_embeddings:
            emb = model.embed_tokens.weight
            self.weight_bytes_per_step -= emb.numel() * emb.element_size()

    @classmethod
    def load(cls, source=None, device="auto", dtype="auto", compile=False, max_seq_len=None, progress=True,
             quant=None, group_size=None):
        """source: None (the embedded SmolLM2), a HF directory (a flint-quantized one too), a Hub repo id
        or a .gguf file. quant: None, "int8" or "int4" (quantize in memory at load, group_size for int4),
        or "gguf" (a GGUF's Q4_0/Q4_1/Q8_0 blocks straight into int4/int8 layers)."""
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        if quant not in (None, "int8", "int4", "gguf"):
            raise ValueError(f"unknown --quant '{quant}' (choose from int8, int4, gguf; GPTQ/AWQ: quantize.py)")
        if quant == "gguf":
            model, args, info = quantized_from_gguf(source or default_model_path(), device, dtype, progress)
        elif source is not None and is_quantized_dir(source):
            model, args = load_quantized(source, device, dtype, progress)
            info = {"kind": "hf_dir", "path": source}
        else:
            model, args, info = load_model(source, device=device, dtype=dtype, progress=progress)
            if quant is not None:
                quantize_model(model, quant, group_size)
        tokenizer = load_tokenizer(info["metadata"] if info["kind"] == "gguf" else info["path"])
        return cls(model, tokenizer, device, dtype, compile=compile, max_seq_len=max_seq_len)

    # ------------------------------------------------------------ prompts

    def encode(self, prompt, chat: bool = False) -> list[int]:
        """A string (or a list of chat messages when chat=True) -> token ids. Token lists pass through."""
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            return list(prompt)
        if chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.encode_chat(messages)
        return self.tokenizer.encode(prompt)

    def fit(self, prompt_lens: list[int], max_new_tokens: int) -> tuple[int, int]:
        """(longest prompt, new tokens that fit in the context) for a batch; a clear error for an empty
        prompt or one that leaves no room. Generation stops at the context's end (finish_reason length)."""
        if min(prompt_lens) == 0:
            raise ValueError("empty prompt: give at least one token")
        longest = max(prompt_lens)
        if longest >= self.max_seq_len:
            raise ValueError(f"prompt has {longest} tokens but the context is {self.max_seq_len} tokens "
                             f"(shorten it{' or raise --max-seq-len' if self.max_seq_len < self.args.max_seq_len else ''})")
        return longest, min(max_new_tokens, self.max_seq_len - longest)

    def _cache_for(self, batch_size: int, seq_len: int) -> StaticKVCache:
        # Reuse the cache when it fits. Compiled decode attends over the whole cache, so its length
        # comes in few sizes (powers of two from 1024) and a new prompt length rarely changes a shape.
        if seq_len > self.max_seq_len:
            raise ValueError(f"{seq_len} tokens do not fit the context of {self.max_seq_len}")
        if self.compiled:
            seq_len = min(self.max_seq_len, max(1024, 1 << (seq_len - 1).bit_length()))
        else:
            seq_len = min(self.max_seq_len, 64 * math.ceil(seq_len / 64))
        c = self.cache
        if c is None or c.batch_size != batch_size or c.max_seq_len < seq_len:
            self.cache = None  # free the old one first
            c = self.cache = StaticKVCache(self.args, batch_size, seq_len, self.device, self.dtype)
        return c

    # ------------------------------------------------------------ generation

    def iter_generate(self, prompts, params: SamplingParams | None = None, chat: bool = False):
        """Runs prompts (strings, token-id lists, or message lists with chat=True) as one static batch.
        Yields (row, text_piece) as text becomes safe to print (never half a character, never part of
        a stop string); returns the list of Results (the generator's return value)."""
        params = params or SamplingParams()
        seqs = [Sequence(self.encode(p, chat), StreamDecoder(self.tokenizer) if self.tokenizer else None, params.stop)
                for p in prompts]
        for row in self._steps(seqs, params):
            for b in row:
                if piece := seqs[b].take_text():
                    yield b, piece
        return [Result(p, s.text, s.token_ids, s.finish_reason, len(s.prompt_ids)) for p, s in zip(prompts, seqs)]

    def generate(self, prompts, params: SamplingParams | None = None, chat: bool = False, on_text=None):
        """Like iter_generate, returning the Results; on_text(row, piece) streams the text."""
        return drain(self.iter_generate(prompts, params, chat), on_text)

    def stream(self, prompt, params: SamplingParams | None = None, chat: bool = False):
        """Yields the text of one prompt piece by piece."""
        for _, piece in self.iter_generate([prompt], params, chat):
            yield piece

    @torch.inference_mode()
    def _steps(self, seqs: list["Sequence"], params: SamplingParams):
        """The generation loop: prefill, then one decode step per token. After each step it appends
        every running row's token to its Sequence and yields the rows that got one."""
        B = len(seqs)
        lens = [len(s.prompt_ids) for s in seqs]
        longest, max_new = self.fit(lens, params.max_new_tokens)
        cache = self._cache_for(B, longest + max_new)
        dev = self.device
        generator = make_generator(params.seed, dev)

        # every row's tokens so far, -1 where there are none (the repetition penalty reads it)
        history = torch.full((B, longest + max_new), -1, dtype=torch.long, device=dev)
        for b, s in enumerate(seqs):
            history[b, : lens[b]] = torch.tensor(s.prompt_ids, device=dev)
        penalty_history = history if params.repetition_penalty != 1.0 else None

        m = self.metrics = Metrics(batch_size=B, prompt_tokens=sum(lens), weight_bytes=self.weight_bytes,
                                   weight_bytes_per_step=self.weight_bytes_per_step, kv_cache_bytes=cache.nbytes)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()

        # prefill: right-padded prompts [B, longest], each row at positions 0..len-1
        if not self.compiled:  # compiled decode attends over the whole cache: one shape
            cache.attend_upto(longest)
        tokens = history[:, :longest].clamp(min=0)
        pos = torch.tensor(lens, device=dev)  # [B]: where each row's next token goes
        logits = self.model(tokens, None, cache, logits_at=pos - 1)[:, 0]  # [B, vocab]; None: from 0
        next_tok = sample(logits, params, generator, penalty_history)

        eos = set() if params.ignore_eos or self.tokenizer is None else self.tokenizer.eos_ids
        rows = torch.arange(B, device=dev)
        cuda = dev.type == "cuda"
        host_tok = torch.empty(B, dtype=torch.long, pin_memory=cuda)
        t_first = None
        for step in range(max_new):
            # Start this token's trip to the host, then queue the next decode step before looking at
            # it: the GPU computes token step+1 while Python does the bookkeeping of token step.
            # (A row that has finished computes one step more than it needs; nobody reads it.)
            host_tok.copy_(next_tok, non_blocking=cuda)
            copied = torch.cuda.Event() if cuda else None
            if cuda:
                copied.record()
            if penalty_history is not None:
                penalty_history[rows, pos] = next_tok  # pos: where this token sits in each row
            if step + 1 < max_new:
                if not self.compiled:  # attend over the longest row so far
                    cache.attend_upto(longest + step + 1)
                logits = self._decode(next_tok[:, None], pos[:, None], cache)[:, 0]  # one token per row
                m.decode_steps += 1
                m.kv_read_bytes += cache.nbytes * cache.kv_len // cache.max_seq_len
                pos = (pos + 1).clamp(max=cache.max_seq_len - 1)
                following = sample(logits, params, generator, penalty_history)
            if cuda:
                copied.synchronize()
            toks = host_tok.tolist()
            if t_first is None:
                t_first = time.perf_counter()
                m.ttft_s = t_first - t0
            got = []
            for b, s in enumerate(seqs):
                if s.finish_reason is not None:
                    continue
                s.append(toks[b], toks[b] in eos)
                if s.finish_reason is None and step + 1 >= max_new:
                    s.finish("length")
                got.append(b)
            m.new_tokens += len(got)
            yield got
            if all(s.finish_reason is not None for s in seqs):
                break
            next_tok = following
        m.decode_s = time.perf_counter() - (t_first or t0)
        m.decode_tok_per_s = (m.new_tokens - B) / m.decode_s if m.decode_s > 0 else 0.0
        m.peak_memory_bytes = peak_memory_bytes(dev)


    def _decode(self, tokens, input_pos, cache):
        """One decode step: tokens, input_pos [B, 1] -> logits [B, 1, vocab]."""
        if not (self.compiled and self.device.type == "cuda"):
            return self.model(tokens, input_pos, cache)
        g = self._graph
        if g is None or g["cache"] is not cache or g["tokens"].shape != tokens.shape:
            self._graph = None
            g = {"cache": cache, "tokens": tokens.clone(), "pos": input_pos.clone()}
            # Warm up (compiles) on a side stream. It writes the same keys and values the real step
            # writes (same tokens, same positions), so the cache is unharmed.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model(g["tokens"], g["pos"], cache)
            torch.cuda.current_stream().wait_stream(side)
            g["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g["graph"]):
                g["logits"] = self.model(g["tokens"], g["pos"], cache)
            self._graph = g
        g["tokens"].copy_(tokens)
        g["pos"].copy_(input_pos)
        g["graph"].replay()
        return g["logits"]


class Sequence:
    """One prompt's state: its tokens, its text, and why it stopped."""

    def __init__(self, prompt_ids: list[int], decoder: StreamDecoder | None, stop=()):
        self.prompt_ids, self.decoder, self.stop = prompt_ids, decoder, tuple(stop)
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far, cut at a stop string
        self.shown = 0  # characters already handed out by take_text
        self.finish_reason: str | None = None  # "eos" | "stop" | "length" | "cancelled"

    def append(self, token: int, is_eos: bool):
        if is_eos:  # EOS ends the sequence and is not part of its text
            self.finish("eos")
            return
        self.token_ids.append(token)
        if self.decoder is None:  # token ids only (benchmarks with random weights have no tokenizer)
            return
        start = len(self.text)
        self.text += self.decoder.put(token)
        cut = find_stop(self.text, self.stop, start) if self.stop else None
        if cut is not None:
            self.text = self.text[:cut]
            self.finish("stop")

    def finish(self, reason: str):
        self.finish_reason = reason
        if reason != "stop" and self.decoder is not None:
            self.text += self.decoder.flush()

    def take_text(self) -> str:
        """New text that is safe to show: all of it once finished, else all but a possible stop-string start."""
        ready = len(self.text)
        if self.finish_reason is None and self.stop:
            ready -= stop_holdback(self.text, self.stop)
        piece = self.text[self.shown:ready] if ready > self.shown else ""
        self.shown = max(self.shown, ready)
        return piece
