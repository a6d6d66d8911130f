"""The engine: requests in, tokens out. Every front door (generate.py, chat_app.py, server.py, bench.py)
drives this one Engine, so there is one generation loop in the project.

    from scheduler import Engine
    from sampling import SamplingParams
    engine = Engine.load()                                  # the embedded SmolLM2-135M-Instruct
    [out] = engine.generate(["The capital of France is"], SamplingParams(max_new_tokens=20))
    print(out.text)
    for piece in engine.stream("Tell me a joke", SamplingParams(temperature=0.7), chat=True):
        print(piece, end="", flush=True)

Static batching (Engine.generate, the default for a single prompt): a batch of prompts of different
lengths is right-padded and every row runs at its own positions (see kv.py), so each row's tokens equal
what it would get alone. Rows that finish early keep their slot until the whole batch is done.

Continuous batching (Scheduler, over kv.PagedKVCache): requests join and leave at every step; see
Engine.submit / step / cancel / start / stream_async and generate(..., batching="continuous").
"""
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

import cuda_kernels
import gemv
from kv import NoFreeBlocks, PagedKVCache, StaticKVCache
from quantize import Int4Linear, load_quantized, model_bytes, quantize_model, quantized_from_gguf
from sampling import SamplingParams, find_stop, make_generator, sample, sample_each, stop_holdback
from tokenizer import StreamDecoder, load_tokenizer
from weights import default_model_path, load_model, read_json


@dataclass
class Result:
    prompt: str | list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    error: str | None = None  # why a request was rejected (finish_reason "error")


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
        if self.decode_tok_per_s > 0:
            gb_s = (self.weight_bytes_per_step * self.decode_steps + self.kv_read_bytes) / max(self.decode_s, 1e-9) / 1e9
            decode = (f"decode {self.decode_tok_per_s:.1f} tok/s "
                      f"({self.batch_size} x {self.decode_steps} steps, ~{gb_s:.1f} GB/s)")
        else:  # every row stopped at its first token: no decode rate to report
            decode = "decode: no tokens after the first"
        return f"TTFT {self.ttft_s * 1000:.0f} ms | {decode} | peak memory {self.peak_memory_bytes / 1e9:.2f} GB"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device '{device}' (choose from auto, cpu, cuda, cuda:N)")
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
    return (read_json(config).get("quantization_config") or {}).get("quant_method") == "flint"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource  # host: the process's peak resident set, in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def capture_cuda_graph(step):
    """Runs step() twice on a side stream (compiling it), then captures one call in a CUDA graph.
    -> (graph, the output tensor the graph writes on every replay). The warm-up calls must be harmless
    to repeat: a decode step rewrites the same keys and values at the same positions."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


class GraphedForward:
    """model(tokens [B, T], input_pos [B, T], cache) -> logits [B, T, vocab] for steps whose shapes repeat
    (decode, speculative verification). On a compiled CUDA engine each token shape is captured once in a
    CUDA graph over the compiled block and then replayed: a step costs one graph launch instead of
    hundreds of kernel launches. Elsewhere it is the plain call. The graphs hold this cache's tensors,
    so it is one object per cache; the returned logits are overwritten by the next replay."""

    def __init__(self, model, cache, device, graphs: bool):
        self.model, self.cache, self.device, self.use_graphs = model, cache, device, graphs
        self.graphs: dict[tuple, dict] = {}  # tokens shape -> graph, its input buffers and its output

    def __call__(self, tokens, input_pos):
        """tokens, input_pos: on the device, or in pinned host memory (copied without a sync)."""
        if not self.use_graphs:
            return self.model(tokens.to(self.device), input_pos.to(self.device), self.cache)
        g = self.graphs.get(tuple(tokens.shape))
        if g is None:
            if self.device.type == "cuda":  # gemv.py's kernels pick their configs for this row count before the
                dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.bfloat16)
                with torch.no_grad():
                    gemv.tune_linears(self.model, dtype, self.device, [tokens.numel()])  # trace (Linear.fuses_rows)
            g = {"tokens": tokens.to(self.device, copy=True), "pos": input_pos.to(self.device, copy=True)}
            # Warm up (compiles) on a side stream. It writes the keys and values the real step writes
            # (same tokens, same positions), so the cache is unharmed.
            g["graph"], g["logits"] = capture_cuda_graph(
                lambda: self.model(g["tokens"], g["pos"], self.cache, compiled=True))
            self.graphs[tuple(tokens.shape)] = g
        g["tokens"].copy_(tokens, non_blocking=True)
        g["pos"].copy_(input_pos, non_blocking=True)
        g["graph"].replay()
        return g["logits"]


def check_paged_config(c: dict, cuda: bool):
    """One clear error for a bad pool or scheduling option (before anything is allocated)."""
    sizes = (16, 32, 64, 128, 256) if cuda else (8, 16, 32, 64, 128, 256)  # GPU kernels tile by >= 16
    if c["block_size"] not in sizes:
        raise ValueError(f"--block-size {c['block_size']}: choose {', '.join(map(str, sizes))} tokens")
    for name in ("kv_tokens", "max_batch", "max_tokens_per_step"):
        if c[name] is not None and (not isinstance(c[name], int) or c[name] < 1):
            raise ValueError(f"--{name.replace('_', '-')} {c[name]}: must be a positive integer")
    g = c["gpu_memory_utilization"]
    if not (isinstance(g, (int, float)) and 0 < g <= 1):
        raise ValueError(f"--gpu-memory-utilization {g}: must be in (0, 1]")


class Engine:
    def __init__(self, model, tokenizer, device, dtype, compile: bool = False, max_seq_len: int | None = None,
                 kv_tokens: int | None = None, gpu_memory_utilization: float = 0.9, block_size: int = 64,
                 max_batch: int | None = None, max_tokens_per_step: int | None = None, prefix_caching: bool = True,
                 overlap: bool = True):
        """Continuous batching (created on first use) runs over a paged KV pool of kv_tokens tokens, or on
        a GPU of what gpu_memory_utilization leaves; max_batch sequences decode together, and a step
        computes at most max_tokens_per_step tokens (decodes plus prompt chunks). overlap: queue each
        decode step before reading the last one back (more throughput, a step more of latency)."""
        self.paged_config = dict(kv_tokens=kv_tokens, gpu_memory_utilization=gpu_memory_utilization,
                                 block_size=block_size, max_batch=max_batch, max_tokens_per_step=max_tokens_per_step,
                                 prefix_caching=prefix_caching, overlap=overlap)
        self._scheduler = None
        self._lock = threading.RLock()  # the background loop steps under it; submit/cancel take it too
        self._wake = threading.Condition(self._lock)
        self._loop: threading.Thread | None = None
        self.loop_errors: list[str] = []
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ValueError(f"--max-seq-len {max_seq_len}: must be a positive integer")  # 0 read as "the default"
        device_type = torch.device(device).type
        bad = sorted({f"{p.dtype} on {p.device}" for p in model.parameters()
                      if p.dtype != dtype or p.device.type != device_type})
        if bad:  # else the first step fails deep inside (a cache of one dtype, keys of another)
            raise ValueError(f"Engine runs {dtype} on {device}, but the model's parameters are {', '.join(bad)}: "
                             f"move it first (model.to(device, dtype)) or use Engine.load")
        self.model, self.tokenizer = model, tokenizer
        self.args = model.args
        self.device, self.dtype = device, dtype
        self.max_seq_len = min(max_seq_len or self.args.max_seq_len, self.args.max_seq_len)
        self.cache: StaticKVCache | None = None
        # an int4 model's batch-1 decode attends through cuda_kernels' one-kernel attention (sm_90), which starts
        # early under cuda_kernels' int4 GEMV (+1.8% on the H200); the rest keeps the Triton kernels (the CUDA one
        # measured 0.1-1.1% slower with bf16, int8, and int4 at batch 8): see kv.use_cuda_attention
        self.int4 = any(isinstance(m, Int4Linear) for m in model.modules())
        self.metrics = Metrics()
        self.compiled = compile
        self._graph: GraphedForward | None = None  # decode steps over self.cache (CUDA graphs if compiled)
        if compile:
            # Decode has static shapes ([B, 1] tokens over a fixed-size cache): one compiled block
            # serves every layer, every step and every prompt length. On CUDA the whole step is then
            # captured in a CUDA graph by hand, so a token costs one graph launch. A CPU has no such
            # graph, so there all layers compile as one graph (one call per token; slower to compile).
            cuda = torch.device(device).type == "cuda"
            if cuda:  # decode's few-row bf16 matmuls through gemv.py's Triton GEMV (faster than cuBLAS there)
                cuda_kernels.prebuild(device)  # nvcc in the background while torch.compile works (no-op once built)
                gemv.use_for_linears(self.model)
            self.model.compile_decode(whole_model=not cuda)
        # bytes of weights one decode step reads: everything but the embedding table, of which a
        # step reads one row (unless it is tied to the lm head, which reads all of it)
        self.weight_bytes = model_bytes(model)  # parameters and quantized buffers, shared ones once
        self.weight_bytes_per_step = self.weight_bytes
        if not self.args.tie_embeddings:
            emb = model.embed_tokens.weight
            self.weight_bytes_per_step -= emb.numel() * emb.element_size()

    @property
    def cuda_graphs(self) -> bool:
        """Whether steps of static shapes (decode, verification) replay CUDA graphs: compiled, on CUDA."""
        return self.compiled and self.device.type == "cuda"

    @classmethod
    def load(cls, source=None, device="auto", dtype="auto", compile=False, max_seq_len=None, progress=True,
             quant=None, group_size=None, quant_head=None, **paged_config):
        """source: None (the embedded SmolLM2), a HF directory (a flint-quantized one too), a Hub repo id
        or a .gguf file. quant: None, "int8" or "int4" (quantize in memory at load, group_size for int4),
        or "gguf" (a GGUF's Q4_0/Q4_1/Q8_0 blocks straight into int4/int8 layers). quant_head: lm_head's
        storage with quant int8/int4: int8 (None: the default, the matrix most sensitive to rounding), int4 (every
        linear int4, as gpt-fast quantizes) or none (kept in float)."""
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        if quant not in (None, "int8", "int4", "gguf"):
            raise ValueError(f"unknown --quant '{quant}' (choose from int8, int4, gguf; GPTQ/AWQ: quantize.py)")
        if quant_head is not None and quant not in ("int8", "int4"):
            raise ValueError("--quant-head goes with --quant int8 or int4")
        if compile:
            cuda_kernels.prebuild(device)  # the GPU kernels build while the weights load
        if quant == "gguf":
            model, args, info = quantized_from_gguf(source or default_model_path(), device, dtype, progress)
        elif source is not None and is_quantized_dir(source):
            model, args = load_quantized(source, device, dtype, progress)
            info = {"kind": "hf_dir", "path": source}
        else:
            model, args, info = load_model(source, device=device, dtype=dtype, progress=progress)
            if quant is not None:
                quantize_model(model, quant, group_size, head=quant_head or "int8")
        tokenizer = load_tokenizer(info["metadata"] if info["kind"] == "gguf" else info["path"])
        return cls(model, tokenizer, device, dtype, compile=compile, max_seq_len=max_seq_len, **paged_config)

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
        # comes in few sizes (powers of two from 512 on CUDA) and a new prompt length rarely changes a shape.
        if seq_len > self.max_seq_len:
            raise ValueError(f"{seq_len} tokens do not fit the context of {self.max_seq_len}")
        if self.compiled:
            # (on CPU from 256: there attention over unused slots costs real time, a recompile little)
            smallest = 512 if self.device.type == "cuda" else 256
            seq_len = min(self.max_seq_len, max(smallest, 1 << (seq_len - 1).bit_length()))
        # a multiple of 64 slots even when the context is not: attention kernels (cuDNN's on the H200)
        # take an aligned key length, or fall back to slower ones (slots past the context stay unused)
        seq_len = 64 * math.ceil(seq_len / 64)
        c = self.cache
        if c is None or c.batch_size != batch_size or c.max_seq_len < seq_len:
            self.cache = None  # free the old one first
            c = self.cache = StaticKVCache(self.args, batch_size, seq_len, self.device, self.dtype,
                                           cuda_attention=self.int4 and batch_size == 1)
        return c

    # ------------------------------------------------------------ continuous batching

    @property
    def scheduler(self) -> "Scheduler":
        """The continuous-batching scheduler and its paged KV pool, built on first use."""
        if self._scheduler is None:
            c = self.paged_config
            cuda = self.device.type == "cuda"
            check_paged_config(c, cuda)
            max_batch = c["max_batch"] or (256 if cuda else 32)
            kv_tokens = c["kv_tokens"]
            if kv_tokens is None and not cuda:
                kv_tokens = max(self.max_seq_len, min(32768, 8 * self.max_seq_len))
            num_blocks = PagedKVCache.blocks_for_memory(self.args, c["block_size"], self.dtype, self.device,
                                                        c["gpu_memory_utilization"], kv_tokens)
            budget = c["max_tokens_per_step"] or (8192 if cuda else 512)
            cache = PagedKVCache(self.args, num_blocks, c["block_size"], self.device, self.dtype,
                                 max_batch=max_batch, max_tokens_per_step=budget)
            self._scheduler = Scheduler(self, cache, max_batch, budget, c["prefix_caching"], c["overlap"])
        return self._scheduler

    def submit(self, prompt, params: SamplingParams | None = None, n: int = 1, chat: bool = False,
               on_output=None) -> "Request":
        """Queues a request for continuous batching; step() runs it. on_output(request, sample, text)
        streams its text. A bad request raises ValueError here and never enters the queue."""
        params = params or SamplingParams()
        ids = self.encode(prompt, chat)
        with self._wake:
            request = self.scheduler.add(prompt, ids, params, n, on_output)
            self._wake.notify()
        return request

    def step(self):
        """One iteration of continuous batching: -> [(request, sample index, new text)]."""
        with self._lock:
            return self.scheduler.step()

    def cancel(self, request: "Request"):
        """Stops a request; its blocks are free after the next step (at once when nothing is running)."""
        with self._wake:
            self.scheduler.cancel(request)
            self._wake.notify()

    # ------------------------------------------------------------ serving loop

    def start(self):
        """Runs continuous batching in a background thread until stop(). Servers and chat apps submit()
        from any thread and read text through on_output callbacks or `async for` over stream_async().
        A failing step (out of memory, a bug) ends the requests it held with finish_reason "error" and
        the loop goes on serving new ones."""
        if self._loop is not None:
            return
        self.scheduler  # build the pool here, not in the loop thread
        self._stopping = False

        def loop():
            while True:
                with self._wake:
                    while not self._stopping and not self._scheduler.has_work():
                        self._wake.wait()
                    if self._stopping:
                        return
                    try:
                        self._scheduler.step()
                    except Exception as e:  # never take the server down
                        self.loop_errors.append(f"{type(e).__name__}: {e}")
                        self._scheduler.abort_all(f"{type(e).__name__}: {e}")
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()

        self._loop = threading.Thread(target=loop, name="flint-engine", daemon=True)
        self._loop.start()

    def stop(self):
        if self._loop is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._loop.join()
        self._loop = None

    async def stream_async(self, prompt, params: SamplingParams | None = None, chat: bool = False):
        """Yields one prompt's text piece by piece in an asyncio program (start() must be running).
        Leaving the loop early (a client that went away) cancels the request and frees its blocks."""
        import asyncio

        if self._loop is None:
            raise RuntimeError("stream_async needs the background loop: call engine.start() first")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request = self.submit(prompt, params, chat=chat,
                              on_output=lambda req, i, piece: loop.call_soon_threadsafe(
                                  queue.put_nowait, (piece, req.finished)))
        try:
            while True:
                piece, finished = await queue.get()
                if piece:
                    yield piece
                if finished:
                    return
        finally:
            if not request.finished:
                self.cancel(request)

    def _iter_continuous(self, prompts, params, chat):
        sched = self.scheduler
        requests, results = [], [None] * len(prompts)
        t0 = time.perf_counter()
        steps0 = sched.num_steps
        preempt0, queries0, hits0 = sched.num_preemptions, sched.cache.allocator.prefix_queries, sched.cache.allocator.prefix_hits
        for i, p in enumerate(prompts):
            try:
                requests.append(self.submit(p, params, chat=chat))
            except ValueError as e:  # this one is rejected; the others run
                results[i] = Result(p, "", [], "error", error=str(e))
                requests.append(None)
        row_of = {r.id: i for i, r in enumerate(requests) if r is not None}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while any(r is not None and not r.finished for r in requests):
            for request, _, piece in self.step():
                if piece and request.id in row_of:
                    yield row_of[request.id], piece
        done = [r for r in requests if r is not None]
        for i, r in enumerate(requests):
            if r is not None:
                results[i] = r.results()[0]
        end = time.perf_counter()
        firsts = [r.metrics.first_token for r in done if r.metrics.first_token]
        alloc = sched.cache.allocator
        queries = alloc.prefix_queries - queries0
        m = self.metrics = Metrics(batch_size=len(done), prompt_tokens=sum(len(r.prompt_ids) for r in done),
                                   weight_bytes=self.weight_bytes, weight_bytes_per_step=self.weight_bytes_per_step,
                                   kv_cache_bytes=sched.cache.nbytes)
        m.new_tokens = sum(len(s.token_ids) for r in done for s in r.seqs)
        m.ttft_s = (min(firsts) - t0) if firsts else 0.0
        m.decode_s = end - (min(firsts) if firsts else t0)
        m.decode_tok_per_s = m.new_tokens / m.decode_s if m.decode_s > 0 else 0.0
        m.decode_steps = sched.num_steps - steps0
        m.peak_memory_bytes = peak_memory_bytes(self.device)
        m.extra = {"preemptions": sched.num_preemptions - preempt0,
                   "prefix_hit_rate": (alloc.prefix_hits - hits0) / queries if queries else 0.0}
        return results

    # ------------------------------------------------------------ generation

    def iter_generate(self, prompts, params: SamplingParams | None = None, chat: bool = False,
                      batching: str = "static"):
        """Runs prompts (strings, token-id lists, or message lists with chat=True) as one static batch,
        or through the continuous-batching scheduler (batching="continuous": each prompt leaves as soon
        as it is done, new ones could join; a prompt that cannot run comes back with finish_reason
        "error" while the others finish). Yields (row, text_piece) as text becomes safe to print (never
        half a character, never part of a stop string); returns the list of Results."""
        params = params or SamplingParams()
        if batching == "continuous":
            return (yield from self._iter_continuous(prompts, params, chat))
        if batching != "static":
            raise ValueError(f"unknown batching '{batching}' (choose static or continuous)")
        seqs = [Sequence(self.encode(p, chat), StreamDecoder(self.tokenizer) if self.tokenizer else None, params.stop)
                for p in prompts]
        for row in self._steps(seqs, params):
            for b in row:
                if piece := seqs[b].take_text():
                    yield b, piece
        return [Result(p, s.text, s.token_ids, s.finish_reason, len(s.prompt_ids)) for p, s in zip(prompts, seqs)]

    def generate(self, prompts, params: SamplingParams | None = None, chat: bool = False, on_text=None,
                 batching: str = "static"):
        """Like iter_generate, returning the Results; on_text(row, piece) streams the text."""
        return drain(self.iter_generate(prompts, params, chat, batching), on_text)

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
        with gemv.no_tuning():  # a one-off row count: gemv's default kernels, nothing compiled and timed for it
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
                logits = self.decode_forward(next_tok[:, None], pos[:, None], cache)[:, 0]  # one token per row
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


    def decode_forward(self, tokens, input_pos, cache):
        """A step of a few tokens per row at their positions over a static cache: tokens, input_pos
        [B, T] -> logits [B, T, vocab] (T = 1 for decode; speculative verification sends k + 1).
        Compiled on CUDA, each shape is one CUDA graph, replayed; the logits are valid until the next call."""
        if self._graph is None or self._graph.cache is not cache:
            self._graph = None  # free the old graphs first
            self._graph = GraphedForward(self.model, cache, self.device, self.cuda_graphs)
        return self._graph(tokens, input_pos)


# ---------------------------------------------------------------- continuous batching

@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter) of one request's life."""
    arrival: float = 0.0
    scheduled: float | None = None  # first step that computed any of it
    first_token: float | None = None
    finished: float | None = None
    token_times: list = field(default_factory=list)  # when each token of sample 0 came out

    @property
    def queue_s(self):
        return None if self.scheduled is None else self.scheduled - self.arrival

    @property
    def ttft_s(self):
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e_s(self):
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tbt_s(self) -> list[float]:
        """Time between consecutive tokens of sample 0."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


class Request:
    """One prompt, its sampling parameters and its n samples (each a Sequence)."""

    def __init__(self, request_id, prompt, prompt_ids, params: SamplingParams, n: int, on_output=None):
        self.id, self.prompt, self.prompt_ids, self.params, self.n = request_id, prompt, prompt_ids, params, n
        self.on_output = on_output  # called as on_output(request, sample_index, text_piece)
        self.seqs: list[Sequence] = []
        self.error: str | None = None  # set when a failed step ended it (finish_reason "error")
        self.metrics = RequestMetrics(arrival=time.perf_counter())

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.n and all(s.finish_reason is not None for s in self.seqs)

    def results(self) -> list[Result]:
        return [Result(self.prompt, s.text, s.token_ids, s.finish_reason, len(self.prompt_ids), self.error)
                for s in self.seqs]


class Scheduler:
    """Iteration-level continuous batching over a paged KV pool (Orca's scheduling, vLLM's memory).

    Every step: (1) each running sequence whose prompt is done decodes one token; when its next token
    needs a block and none is free, the newest running sequence is preempted (its blocks freed, its
    tokens kept, recomputed when it comes back, through the prefix cache where blocks survived);
    (2) the rest of the token budget goes to prompt chunks: first sequences mid-prompt, then waiting
    ones in arrival order while blocks last (a waiting sequence first looks its prompt up in the
    prefix cache). Decode rows run as one [bucket, 1] batch (one CUDA graph per bucket when compiled),
    the chunks as one packed [1, N] prefill. A sequence is just tokens and how many of them are in
    the cache, so a prompt, a chunk, a decode and a resumed sequence are all the same thing.
    """

    def __init__(self, engine, cache: PagedKVCache, max_batch: int, max_tokens_per_step: int,
                 prefix_caching: bool = True, overlap: bool = True):
        self.engine, self.cache = engine, cache
        self.overlap = overlap  # queue a decode step before reading the last one back (see step)
        self._inflight: dict | None = None  # a launched decode step whose tokens are not read yet
        self._stepping = False
        self.max_batch, self.max_tokens_per_step = max_batch, max_tokens_per_step
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.requests: dict[int, Request] = {}
        self._cancelled: list[Request] = []
        self._next_id = 0
        # decode steps over the pool: one CUDA graph per batch bucket when compiled on CUDA
        self._decode = GraphedForward(engine.model, cache, engine.device, engine.cuda_graphs)
        self.num_preemptions = 0
        self.num_steps = self.num_overlapped = 0
        self.peak_used_blocks = 0
        self.kv_slots_allocated = self.kv_tokens_stored = 0  # summed over steps: the waste is their gap
        self.watermark = max(1, cache.num_blocks // 100)  # blocks kept free for running sequences to grow

    # ------------------------------------------------------------ requests

    def add(self, prompt, prompt_ids: list[int], params: SamplingParams, n: int = 1, on_output=None) -> Request:
        engine, cache = self.engine, self.cache
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} is invalid: must be an integer >= 1")
        if len(prompt_ids) >= engine.max_seq_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens but the context is {engine.max_seq_len} tokens")
        # every sequence must be able to finish alone in the pool, or preemption could never end
        need = min(len(prompt_ids) + params.max_new_tokens, engine.max_seq_len)
        if need > cache.capacity_tokens:
            raise ValueError(f"request needs {need} tokens of KV memory (prompt {len(prompt_ids)} + "
                             f"{params.max_new_tokens} new) but the whole pool holds {cache.capacity_tokens}")
        if n > self.max_batch:
            raise ValueError(f"n={n} samples exceed the batch limit of {self.max_batch}")
        request = Request(self._next_id, prompt, prompt_ids, params, n, on_output)
        self._next_id += 1
        seq = self._new_sequence(request, 0)
        self.requests[request.id] = request
        self.waiting.append(seq)
        return request

    def _new_sequence(self, request: Request, index: int) -> "Sequence":
        tok = self.engine.tokenizer
        seq = Sequence(request.prompt_ids, StreamDecoder(tok) if tok else None, request.params.stop)
        seq.request, seq.index = request, index
        seed = request.params.seed
        seq.generator = make_generator(None if seed is None else seed + index, self.engine.device)
        request.seqs.append(seq)
        return seq

    def cancel(self, request: Request):
        """Stops a request and frees its blocks: at once, or at the start of the next step when called
        from inside one (an on_output callback). A step queued on the device that still computes its
        row is harmless: the blocks are only reused by steps queued after it."""
        self._cancelled.append(request)
        if not self._stepping:
            events = []
            self._apply_cancellations(events)
            self._dispatch(events)

    def _dispatch(self, events):
        for request, index, piece in events:
            if request.on_output is not None:
                request.on_output(request, index, piece)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._cancelled or self._inflight)

    def warmup(self, max_rows: int | None = None, prefill: bool = True):
        """Compile (and on CUDA capture) the decode buckets up to max_rows sequences (default: all, up to
        max_batch) and, with prefill, a few prefill sizes up front, on scratch block 0, so no request pays for
        compilation later. Returns the seconds it took."""
        t0 = time.perf_counter()
        cache, dev = self.cache, self.engine.device
        buckets, last = [self._bucket(1)], self._bucket(max_rows or self.max_batch)
        while buckets[-1] < last:
            buckets.append(min(self.max_batch, buckets[-1] * 2))
        with torch.inference_mode():
            if dev.type == "cuda":  # gemv.py's kernels time their configs now, not in a request's chunk
                gemv.tune_linears(self.engine.model, self.engine.dtype, dev, buckets if max_rows else None)
            for bucket in buckets:
                cache.plan_decode([], [], bucket)
                zeros = torch.zeros(bucket, 1, dtype=torch.long)
                self._decode(zeros, zeros)
            qb, page = cache.q_block, cache.block_size
            n = qb
            while prefill and n <= max(qb, min(self.max_tokens_per_step, 4 * qb)):  # a few sizes: the kernel is dynamic
                cache.plan_prefill([([0] * math.ceil(n / page), 0, n)])  # one chunk of n tokens in block 0
                self.engine.model(torch.zeros(1, n, dtype=torch.long, device=dev),
                                  torch.zeros(1, n, dtype=torch.long, device=dev), cache,
                                  logits_at=torch.zeros(1, 1, dtype=torch.long, device=dev))
                n *= 2
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    # ------------------------------------------------------------ one step

    def _finish(self, seq: "Sequence", reason: str):
        if seq.finish_reason is None:
            seq.finish(reason)
        self.cache.free(seq.block_table)
        seq.block_hashes.clear()
        if seq in self.running:
            self.running.remove(seq)
        request = seq.request
        if request.finished:
            request.metrics.finished = time.perf_counter()
            self.requests.pop(request.id, None)

    def _preempt(self, seq: "Sequence"):
        """Free a running sequence's blocks; it waits at the front of the queue and recomputes its tokens."""
        self.running.remove(seq)
        self.cache.free(seq.block_table)
        seq.block_hashes.clear()
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def abort_all(self, message: str):
        """End every request in the scheduler with finish_reason "error" (after a failed step) and free
        all blocks; the scheduler is then empty and ready for new requests."""
        self._inflight = None
        for request in list(self.requests.values()):
            for seq in request.seqs:
                if seq.finish_reason is None:
                    seq.finish("error")
                self.cache.free(seq.block_table)
                seq.block_hashes.clear()
            while len(request.seqs) < request.n:
                self._new_sequence(request, len(request.seqs)).finish("error")
            request.error = message
            request.metrics.finished = time.perf_counter()
            if request.on_output is not None:
                request.on_output(request, 0, "")
        self.requests.clear()
        self.waiting.clear()
        self.running.clear()
        self._cancelled.clear()

    def _apply_cancellations(self, events):
        while self._cancelled:
            request = self._cancelled.pop()
            for seq in request.seqs:
                if seq.finish_reason is None:
                    if seq in self.waiting:
                        self.waiting.remove(seq)
                    self._finish(seq, "cancelled")
                    events.append((request, seq.index, ""))
            while len(request.seqs) < request.n:  # samples never forked count as cancelled too
                self._new_sequence(request, len(request.seqs)).finish("cancelled")
            if request.finished and request.metrics.finished is None:
                request.metrics.finished = time.perf_counter()
            self.requests.pop(request.id, None)

    def _schedule(self):
        """-> (decode sequences, [(sequence, chunk length)]): what this step computes."""
        cache = self.cache
        decode, preempted = [], set()
        for seq in list(self.running):
            if seq in preempted or seq.uncomputed != 1 or len(decode) == self.max_batch:
                continue
            while True:  # make room for this token, preempting from the newest end if needed
                try:
                    cache.reserve(seq.block_table, seq.num_computed, 1)
                    decode.append(seq)
                    break
                except NoFreeBlocks:
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted.add(victim)
                    if victim is seq:
                        break
        budget = self.max_tokens_per_step - len(decode)
        chunks = []
        for seq in self.running:  # prompts already started
            if seq.uncomputed > 1 and budget > 0:
                n = self._fit_chunk(seq, budget)
                if n > 0:
                    chunks.append((seq, n))
                    budget -= n
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            fresh = seq.index == 0 and len(seq.request.seqs) < seq.request.n  # its samples fork later
            if len(self.running) + (seq.request.n if fresh else 1) > self.max_batch:
                break
            if self.prefix_caching and not seq.block_table:
                seq.num_computed = cache.match_prefix(seq.tokens, seq.block_table, seq.block_hashes)
            reserve = 0 if not self.running and not chunks else self.watermark
            n = self._fit_chunk(seq, budget, reserve)
            if n <= 0:  # not enough memory: give back the prefix blocks it holds and wait
                cache.free(seq.block_table)
                seq.block_hashes.clear()
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            chunks.append((seq, n))
            budget -= n
        return decode, chunks

    def _fit_chunk(self, seq, budget: int, reserve: int = 0) -> int:
        """Allocate blocks for as much of seq's uncomputed tokens as the budget and free blocks allow."""
        cache, page = self.cache, self.cache.block_size
        n = min(seq.uncomputed, budget)
        free = cache.allocator.num_free_blocks - reserve
        room = (len(seq.block_table) + max(free, 0)) * page - seq.num_computed
        n = min(n, room)
        if n <= 0:
            return 0
        cache.reserve(seq.block_table, seq.num_computed, n)
        return n

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int, str]]:
        """Runs one iteration. Returns (request, sample index, new text) for every sequence that got
        text or finished; callbacks see the same.

        Overlap: when the last step was decode only and nothing else waits, this step is queued on the
        device before the last one's tokens come back to the host (the next input tokens go device to
        device), so the host's bookkeeping runs while the GPU computes. A sequence that turns out to
        have stopped at the last token (EOS, a stop string) computed one row for nothing this step."""
        events: list[tuple[Request, int, str]] = []
        self._stepping = True
        try:
            self._step(events)
        finally:
            self._stepping = False
        self._dispatch(events)
        return events

    def _step(self, events):
        overlapped = self._overlappable()
        if overlapped is not None:
            self.num_overlapped += 1
            self._count_step(overlapped, [])
            launched = self._launch_decode(overlapped, self._inflight)
            self._resolve(self._inflight, events)
            self._inflight = launched
        else:
            if self._inflight is not None:
                self._resolve(self._inflight, events)
                self._inflight = None
            self._apply_cancellations(events)
            decode, chunks = self._schedule()
            self._count_step(decode, chunks)
            now = time.perf_counter()
            for seq, _ in chunks:
                if seq.request.metrics.scheduled is None:
                    seq.request.metrics.scheduled = now
            launched = self._launch_decode(decode) if decode else None
            first_tokens = self._prefill(chunks) if chunks else None
            if launched is not None and first_tokens is None and self.overlap:
                self._inflight = launched  # read back during the next step
            elif launched is not None:
                self._resolve(launched, events)
            if first_tokens is not None:
                self._resolve(first_tokens, events)

    def _count_step(self, decode, chunks):
        self.num_steps += 1
        alloc = self.cache.allocator
        self.peak_used_blocks = max(self.peak_used_blocks, alloc.num_used_blocks)
        self.kv_slots_allocated += alloc.num_used_blocks * self.cache.block_size
        self.kv_tokens_stored += sum(s.num_computed for s in self.running) + len(decode) + sum(n for _, n in chunks)

    def _overlappable(self) -> list["Sequence"] | None:
        """The sequences of an overlapped decode step, with their blocks ready; None when this step
        must wait for the last one (prompts to schedule, cancellations, a repetition penalty that needs
        the last token, a block shortage that might need a preemption)."""
        inflight = self._inflight
        if inflight is None or not self.overlap or self.waiting or self._cancelled:
            return None
        live = [s for s in inflight["seqs"] if s.finish_reason is None]
        if len(live) != len(self.running):
            return None
        seqs, need = [], 0
        for s in live:
            params = s.request.params
            if params.repetition_penalty != 1.0:
                return None
            # the token in flight is its last if it reaches a length limit
            if len(s.token_ids) + 1 >= params.max_new_tokens or len(s.tokens) + 1 >= self.engine.max_seq_len:
                continue
            need += self.cache.blocks_to_write(s.block_table, s.num_computed, 1)
            seqs.append(s)
        if not seqs or need > self.cache.allocator.num_free_blocks:
            return None
        for s in seqs:
            self.cache.reserve(s.block_table, s.num_computed, 1)
        return seqs

    def _bucket(self, n: int) -> int:
        # powers of two; on a GPU at least 8 rows (a step of 8 costs what a step of 1 does)
        smallest = 8 if self.engine.device.type == "cuda" else 1
        return min(self.max_batch, max(smallest, 1 << (n - 1).bit_length()))

    def _launch_decode(self, seqs, inflight=None) -> dict:
        """Queue one decode step (one token per sequence) and its sampling; the tokens stay on the
        device until _resolve reads them. Input tokens come from the host, or (overlapped) straight
        from the in-flight step's samples."""
        n, dev = len(seqs), self.engine.device
        bucket = self._bucket(n)
        positions = [s.num_computed for s in seqs]
        self.cache.plan_decode([s.block_table for s in seqs], positions, bucket)
        pos = torch.zeros(bucket, 1, dtype=torch.long)
        pos[:n, 0] = torch.tensor(positions)
        if inflight is None:
            tokens = torch.zeros(bucket, 1, dtype=torch.long)
            tokens[:n, 0] = torch.tensor([s.tokens[s.num_computed] for s in seqs])
        else:
            rows = torch.tensor([inflight["row"][s] for s in seqs], device=dev)
            tokens = torch.zeros(bucket, 1, dtype=torch.long, device=dev)
            tokens[:n, 0] = inflight["sampled"].index_select(0, rows)
        for s in seqs:
            s.num_computed += 1
        logits = self._decode(tokens, pos)[:n, 0]  # [n, vocab]
        return self._start_readback(seqs, self._sample(seqs, logits))

    def _start_readback(self, seqs, sampled) -> dict:
        cuda = sampled.device.type == "cuda"
        host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=cuda)
        host.copy_(sampled, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return {"seqs": seqs, "sampled": sampled, "host": host, "event": event,
                "row": {s: i for i, s in enumerate(seqs)}}

    def _sample(self, seqs, logits) -> torch.Tensor:
        history = None
        if any(s.request.params.repetition_penalty != 1.0 for s in seqs):
            width = max(len(s.tokens) for s in seqs)
            history = torch.full((len(seqs), width), -1, dtype=torch.long)
            for r, s in enumerate(seqs):
                history[r, :len(s.tokens)] = torch.tensor(s.tokens)
            history = history.to(logits.device)
        return sample_each(logits, [s.request.params for s in seqs], [s.generator for s in seqs], history)

    def _prefill(self, chunks) -> dict | None:
        """Compute the chunks packed in one [1, N] forward; the sequences whose chunk reaches their
        last token sample their next token (parallel samples fork here). -> their readback, or None."""
        dev, cache = self.engine.device, self.cache
        tokens, positions, done, ends = [], [], [], []
        plan = []
        for seq, n in chunks:
            start = seq.num_computed
            tokens += seq.tokens[start:start + n]
            positions += range(start, start + n)
            plan.append((seq.block_table, start, n))
            seq.num_computed += n
            if seq.uncomputed == 0:
                done.append(seq)
                ends.append(len(tokens) - 1)
            if self.prefix_caching:
                cache.publish_full_blocks(seq.tokens, seq.num_computed, seq.block_table, seq.block_hashes)
        cache.plan_prefill(plan)
        logits_at = torch.tensor([ends], dtype=torch.long, device=dev)  # [1, K]
        with gemv.no_tuning():  # a request's prefill never waits for gemv to time a new row count's kernels
            logits = self.engine.model(torch.tensor([tokens], device=dev), torch.tensor([positions], device=dev),
                                       cache, logits_at=logits_at)[0]  # [K, vocab]
        if not done:
            return None
        seqs, rows = [], []
        for k, seq in enumerate(done):
            for s in [seq] + self._fork(seq):  # parallel samples share the prompt's blocks from here
                seqs.append(s)
                rows.append(k)
        if len(seqs) != len(done):
            logits = logits.index_select(0, torch.tensor(rows, device=dev))
        return self._start_readback(seqs, self._sample(seqs, logits))

    def _fork(self, seq: "Sequence") -> list["Sequence"]:
        request = seq.request
        if seq.index != 0 or len(request.seqs) >= request.n:
            return []
        children = []
        for i in range(len(request.seqs), request.n):
            child = self._new_sequence(request, i)
            child.block_table = self.cache.share(seq.block_table)
            child.block_hashes = list(seq.block_hashes)
            child.num_computed = seq.num_computed
            self.running.append(child)
            children.append(child)
        return children

    def _resolve(self, batch: dict, events):
        """Read a launched step's tokens back and append them: stop checks, text, metrics, freeing."""
        if batch["event"] is not None:
            batch["event"].synchronize()
        toks = batch["host"].tolist()
        now = time.perf_counter()
        eos_ids = self.engine.tokenizer.eos_ids if self.engine.tokenizer is not None else set()
        for seq, tok in zip(batch["seqs"], toks):
            if seq.finish_reason is not None:  # stopped one token earlier: this row was computed for nothing
                continue
            request, params = seq.request, seq.request.params
            if request.metrics.first_token is None:
                request.metrics.first_token = now
            if seq.index == 0:
                request.metrics.token_times.append(now)
            seq.append(tok, tok in eos_ids and not params.ignore_eos)
            if seq.finish_reason is None and (len(seq.token_ids) >= params.max_new_tokens
                                              or len(seq.tokens) >= self.engine.max_seq_len):
                seq.finish("length")
            if self.prefix_caching:  # blocks now full of computed tokens become reusable prefixes
                self.cache.publish_full_blocks(seq.tokens, seq.num_computed, seq.block_table, seq.block_hashes)
            if seq.finish_reason is not None:
                self._finish(seq, seq.finish_reason)
            piece = seq.take_text()
            if piece or seq.finish_reason is not None:
                events.append((request, seq.index, piece))


class Sequence:
    """One prompt's state: its tokens, its text, and why it stopped."""

    def __init__(self, prompt_ids: list[int], decoder: StreamDecoder | None, stop=()):
        self.prompt_ids, self.decoder, self.stop = prompt_ids, decoder, tuple(stop)
        self.token_ids: list[int] = []
        # continuous batching: prompt + generated tokens, how many of them are in the KV cache, where
        self.tokens: list[int] = list(prompt_ids)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache keys of the full blocks, in order
        self.request, self.index, self.generator = None, 0, None
        self.text = ""  # decoded so far, cut at a stop string
        self.shown = 0  # characters already handed out by take_text
        self.finish_reason: str | None = None  # "eos" | "stop" | "length" | "cancelled"

    def append(self, token: int, is_eos: bool):
        if is_eos:  # EOS ends the sequence and is not part of its text
            self.finish("eos")
            return
        self.token_ids.append(token)
        self.tokens.append(token)
        if self.decoder is None:  # token ids only (benchmarks with random weights have no tokenizer)
            return
        start = len(self.text)
        self.text += self.decoder.put(token)
        cut = find_stop(self.text, self.stop, start) if self.stop else None
        if cut is not None:
            self.text = self.text[:cut]
            self.finish("stop")

    @property
    def uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

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
