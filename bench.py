"""Benchmarks. Every figure stands beside its ceiling measured in the same run (copy bandwidth, matmul
peak) and beside the reference implementation (Hugging Face transformers) run on the same weights.

    python bench.py decode --preset llama-3-8b --device cuda            # random weights, real shapes
    python bench.py decode --device cpu --json                          # the embedded SmolLM2 (real weights)
    python bench.py decode --model path/or/repo --batch-size 8
    python bench.py decode --preset llama-3-8b --batch-size 8 --profile 15  # where a decode step's time goes
    python bench.py throughput --preset llama-3-8b                      # continuous batching vs generate_batch
    python bench.py serve --preset llama-3-8b --rates 4,16,48           # Poisson arrivals: TTFT/TBT, goodput
    python bench.py prefix --preset llama-3-8b                          # TTFT with and without prefix caching

Prints a readable table, or with --json one JSON object per measurement on stdout.
"""
import argparse
import functools
import json
import sys
import time

import torch

import cuda_kernels
from model import ModelArgs, Transformer
from quantize import format_quality, quality_table, quantize_model
from sampling import SamplingParams
from scheduler import Engine, pick_device, pick_dtype
from weights import transformers_model

PRESETS = {
    "llama-3-8b": ModelArgs(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                            norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    "llama-2-7b": ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                            norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096),
    "llama-3.2-1b": ModelArgs(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                              ffn_dim=8192, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True),
    "smollm2-135m": ModelArgs(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                              norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(args: ModelArgs, device, dtype) -> Transformer:
    """Real shapes, random weights (std 0.02), built straight on the device without a CPU copy."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.finish_loading(device)
    return model.eval().requires_grad_(False)


def copy_bandwidth(device, nbytes=None) -> float:
    """Device memory copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t) / 1e9


def matmul_peak(device, dtype) -> float:
    """Dense matmul TFLOP/s on random data in the model's dtype."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def reference_decode(model: Transformer, prompt: torch.Tensor, new_tokens: int, static_cache: bool):
    """transformers on the same weights: greedy generate (with its static cache on GPU; transformers
    5.17 compiled nothing by itself there, its first call took 0.2-0.3 s). Decode tok/s from the
    difference between generating new_tokens and 1 token."""
    ref = transformers_model(model)
    device = prompt.device
    B = prompt.shape[0]
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static_cache:
        kw["cache_implementation"] = "static"

    def run(n):
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - t

    t_first = run(1)  # first call
    run(new_tokens)  # warm-up at full length
    t1 = min(run(1) for _ in range(2))
    tn = min(run(new_tokens) for _ in range(2))
    del ref
    return {"ref_tok_per_s": B * (new_tokens - 1) / max(tn - t1, 1e-9), "ref_first_call_s": t_first,
            "ref_ttft_s": t1}


def bench_decode(opts) -> dict:
    if opts.quant_head and opts.quant not in ("int8", "int4"):  # Engine.load checks it too; a preset skips that
        raise ValueError("--quant-head goes with --quant int8 or int4")
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    compile = opts.compile if opts.compile is not None else device.type == "cuda"
    max_seq_len = opts.prompt_len + opts.new_tokens + 1
    t_start = time.perf_counter()
    if opts.model or opts.preset is None:
        engine = Engine.load(opts.model, device=str(device), dtype=dtype, compile=compile,
                             max_seq_len=max_seq_len, progress=False, quant=opts.quant, group_size=opts.group_size,
                             quant_head=opts.quant_head)
        name = opts.model or "smollm2-135m-instruct (embedded GGUF, real weights)"
    else:
        if compile:
            cuda_kernels.prebuild(device)  # as Engine.load: the GPU kernels build while the weights are made
        model = random_model(PRESETS[opts.preset], device, dtype)
        if opts.quant:
            quantize_model(model, opts.quant, opts.group_size, head=opts.quant_head or "int8")
        engine = Engine(model, None, device, dtype, compile=compile, max_seq_len=max_seq_len)
        name = f"{opts.preset} (random weights{', ' + opts.quant if opts.quant else ''})"
    if opts.quant in ("int8", "int4") and opts.quant_head not in (None, "int8"):
        name += f" lm_head {opts.quant_head}"
    load_s = time.perf_counter() - t_start

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, engine.args.vocab_size - 100, (opts.batch_size, opts.prompt_len), generator=g)
    prompts = [row.tolist() for row in prompt]
    params = SamplingParams(max_new_tokens=opts.new_tokens, ignore_eos=True)

    # compile_s: the first request, from its start to its first decoded token: prefill, compilation
    # and CUDA graph capture included (the whole wait a user sees before tokens flow)
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))
    compile_s = time.perf_counter() - t0
    cuda_kernels.wait_for_builds()  # a build the first request did not need may still run: not beside the timing
    engine.generate(prompts, params)  # warm-up at full length
    runs = []
    for _ in range(opts.repeats):
        engine.generate(prompts, params)
        runs.append(engine.metrics)
    m = max(runs, key=lambda r: r.decode_tok_per_s)

    copy_gb_s = copy_bandwidth(device)
    tflops = matmul_peak(device, dtype)
    step_s = m.decode_s / max(m.decode_steps, 1)
    bytes_per_step = m.weight_bytes_per_step + m.kv_read_bytes / max(m.decode_steps, 1)
    n_params = sum(p.numel() for p in {id(p): p for p in engine.model.parameters()}.values())
    gb_s = bytes_per_step / step_s / 1e9
    row = {
        "bench": "decode", "model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "compile": compile,
        "batch_size": opts.batch_size, "prompt_len": opts.prompt_len, "new_tokens": opts.new_tokens,
        "tok_per_s": m.decode_tok_per_s, "gb_per_s": gb_s, "copy_gb_per_s": copy_gb_s, "bw_fraction": gb_s / copy_gb_s,
        "tflop_per_s": 2 * n_params * opts.batch_size / step_s / 1e12, "matmul_peak_tflop_per_s": tflops,
        "ttft_s": m.ttft_s, "prefill_tok_per_s": m.prompt_tokens / m.ttft_s, "compile_s": compile_s,
        "load_s": load_s, "peak_mem_gb": m.peak_memory_bytes / 1e9, "weight_gb": m.weight_bytes / 1e9,
        "read_gb_per_step": bytes_per_step / 1e9,
    }
    if device.type == "cuda":  # what gemv's tuner picked in this process (picks vary run to run: timing noise)
        import gemv
        import kv
        # whether decode steps asked for cuda_kernels' attention (it runs where it takes the shapes)
        row["cuda_attention"] = engine.cache is not None and kv.use_cuda_attention(engine.cache.cuda_attention)
        row["gemv_picks"] = {gemv.pick_name(key): "/".join(map(str, cfg))  # FLINT_GEMV_PICKS takes these back
                             for key, (cfg, _) in sorted(gemv.tuning_log().items(), key=str)
                             if key[1] == gemv.row_bucket(opts.batch_size)}
    if opts.profile:
        row["profile"] = profile_decode(engine, prompts, opts.new_tokens, opts.profile, device)
    if not opts.no_ref and not opts.quant:  # transformers gets the float weights only
        ref = reference_decode(engine.model, prompt.to(device), opts.new_tokens, static_cache=device.type == "cuda")
        row.update(ref)
        row["speedup_vs_ref"] = row["tok_per_s"] / ref["ref_tok_per_s"]
    return row


def profile_decode(engine, prompts, new_tokens: int, top: int, device) -> list[dict]:
    """Where a decode step's time goes: torch.profiler over a generation of new_tokens and over one of a single
    token, each kernel's (GPU) or op's (CPU) self time per decode step from their difference (so the prefill
    and the first call's work cancel out), the `top` largest with calls per step and their share of the step.
    Kernels inside replayed CUDA graphs are counted."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]

    def run(n):
        with profile(activities=activities) as prof:
            engine.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
            sync(device)
        # key_averages: one entry per kernel or op name -> (self time in us, calls)
        totals = {e.key: (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total, e.count)
                  for e in prof.key_averages()}
        return {k: v for k, v in totals.items() if v[0] > 0}, engine.metrics

    one, _ = run(1)
    full, m = run(new_tokens)
    steps = max(m.decode_steps - 1, 1)  # decode steps in the long run that the one-token run does not take
    step_us = m.decode_s / max(m.decode_steps, 1) * 1e6
    rows = []
    for name, (us, count) in full.items():
        us0, count0 = one.get(name, (0.0, 0))
        per_step = (us - us0) / steps
        if per_step > 0:
            rows.append({"kernel": name[:120], "us_per_step": per_step, "calls_per_step": (count - count0) / steps,
                         "share_of_step": per_step / step_us})
    rows.sort(key=lambda r: -r["us_per_step"])
    busy = sum(r["us_per_step"] for r in rows)
    return [{"kernel": "(step, wall)", "us_per_step": step_us, "calls_per_step": 1.0, "share_of_step": 1.0},
            {"kernel": "(all kernels)", "us_per_step": busy, "calls_per_step": sum(r["calls_per_step"] for r in rows),
             "share_of_step": busy / step_us}] + rows[:top]


def bench_prefill(opts) -> list[dict]:
    """Time to first token for long prompts (prefill through SDPA's flash kernel), one prompt at a time."""
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    lens = [int(n) for n in opts.prompt_lens.split(",")]
    args = PRESETS[opts.preset]
    if max(lens) >= args.max_seq_len and opts.preset == "llama-3-8b":  # Llama 3.1: 128k context by RoPE scaling
        args = ModelArgs(**{**args.to_dict(), "max_seq_len": 131072, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}})
    engine = Engine(random_model(args, device, dtype), None, device, dtype, max_seq_len=max(lens) + 64)
    rows = []
    for n in lens:
        prompt = torch.randint(100, args.vocab_size - 100, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
        engine.generate([prompt], params)  # warm-up
        ttft = min((engine.generate([prompt], params), engine.metrics.ttft_s)[1] for _ in range(opts.repeats))
        flops = 2 * n * sum(p.numel() for p in engine.model.layers.parameters())  # matmuls; attention excluded
        rows.append({"bench": "prefill", "model": f"{opts.preset} (random weights)", "prompt_len": n,
                     "rope_scaling": (args.rope_scaling or {}).get("rope_type"), "ttft_s": ttft,
                     "prefill_tok_per_s": n / ttft, "linear_tflop_per_s": flops / ttft / 1e12,
                     "peak_mem_gb": engine.metrics.peak_memory_bytes / 1e9})
    peak = matmul_peak(device, dtype)
    for r in rows:
        r["matmul_peak_tflop_per_s"] = peak
    return rows


def bench_spec(opts) -> dict:
    """Target-only vs speculative on an input-grounded task (copy a passage with corrections), same run.
    With --preset the target has random weights in a real shape and the prompt is random tokens: then
    acceptance means nothing and the figure that counts is the cost of a round against a decode step."""
    import speculative
    from weights import load_model

    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    compile = opts.compile if opts.compile is not None else device.type == "cuda"
    prompts, hf = None, not opts.no_ref
    if opts.preset:
        engine = Engine(random_model(PRESETS[opts.preset], device, dtype), None, device, dtype, compile=compile,
                        max_seq_len=2048)
        g = torch.Generator().manual_seed(0)
        prompts, hf = [torch.randint(100, engine.args.vocab_size - 100, (opts.prompt_len,), generator=g).tolist()], False
    else:
        engine = Engine.load(opts.model, device=str(device), dtype=dtype, compile=compile, progress=False)
    if opts.drafter == "prompt-lookup":
        drafter = speculative.PromptLookupDrafter()
    elif opts.drafter == "self":
        drafter = speculative.self_drafter(engine)
    elif opts.drafter == "self-int4":  # an int4 copy of the target (group 64, int8 head) drafts
        import copy
        drafter = speculative.self_drafter(engine, model=quantize_model(copy.deepcopy(engine.model), "int4"))
    elif opts.draft in PRESETS:
        drafter = speculative.ModelDrafter(random_model(PRESETS[opts.draft], device, dtype), name=f"{opts.draft} (random)")
    elif opts.draft:
        drafter = speculative.ModelDrafter(load_model(opts.draft, engine.device, engine.dtype, progress=False)[0])
    else:
        raise ValueError("--drafter draft needs --draft MODEL (a path, repo id or preset name)")
    row = speculative.bench_speculative(engine, drafter, prompts=prompts, k=opts.k, adaptive=not opts.fixed_k,
                                        new_tokens=opts.new_tokens, repeats=opts.repeats, hf_reference=hf,
                                        chat=prompts is None)
    return {"bench": "speculative", "target": opts.preset or opts.model or "smollm2-135m-instruct",
            "drafter": opts.drafter, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "compile": compile, "torch": torch.__version__, **row}


# ---------------------------------------------------------------- serving (continuous batching)

def serving_engine(opts, before_pool=None):
    """The engine behind the serving benchmarks: a preset with random weights or a real model, compiled
    decode on CUDA, a paged pool sized as the options say, every shape compiled before timing starts.
    before_pool(engine) runs first, while the GPU memory the pool will take is still free."""
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    compile = opts.compile if opts.compile is not None else device.type == "cuda"
    paged = dict(kv_tokens=opts.kv_tokens, gpu_memory_utilization=opts.gpu_memory_utilization,
                 block_size=opts.block_size, max_batch=opts.max_batch, max_tokens_per_step=opts.max_tokens_per_step,
                 overlap=not opts.no_overlap)
    if opts.preset:
        model = random_model(PRESETS[opts.preset], device, dtype)
        engine = Engine(model, None, device, dtype, compile=compile, **paged)
        name = f"{opts.preset} (random weights)"
    else:
        engine = Engine.load(opts.model, device=str(device), dtype=dtype, compile=compile, progress=False, **paged)
        name = opts.model or "smollm2-135m-instruct (embedded GGUF, real weights)"
    if before_pool is not None:
        before_pool(engine)
    warmup_s = engine.scheduler.warmup()
    return engine, name, warmup_s


def random_requests(n, lo, hi, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(100, vocab - 100, (k,), generator=g).tolist() for k in lens]


def engine_row(engine, name, warmup_s):
    device = engine.device
    sched, cache = engine.scheduler, engine.scheduler.cache
    return {"model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(engine.dtype).removeprefix("torch."), "torch": torch.__version__, "compile": engine.compiled,
            "block_size": cache.block_size, "kv_pool_tokens": cache.capacity_tokens, "kv_pool_gb": cache.nbytes / 1e9,
            "max_batch": sched.max_batch, "max_tokens_per_step": sched.max_tokens_per_step, "warmup_s": warmup_s}


def bench_throughput(opts) -> dict:
    """Offline throughput: every request queued at once, each generating exactly output_len tokens."""
    ref = {}

    def reference(engine):  # transformers first: it sizes its paged cache from the free GPU memory
        if not opts.no_ref:
            prompts = random_requests(opts.num_requests, opts.min_prompt, opts.max_prompt, engine.args.vocab_size)
            ref.update(reference_throughput(engine.model, prompts, opts.output_len))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    engine, name, warmup_s = serving_engine(opts, reference)
    sched, cache = engine.scheduler, engine.scheduler.cache
    prompts = random_requests(opts.num_requests, opts.min_prompt, opts.max_prompt, engine.args.vocab_size)
    params = SamplingParams(max_new_tokens=opts.output_len, ignore_eos=True)
    sync(engine.device)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    steps0, alloc0, stored0 = sched.num_steps, sched.kv_slots_allocated, sched.kv_tokens_stored
    t0 = time.perf_counter()
    results = engine.generate(prompts, params, batching="continuous")
    sync(engine.device)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(r.token_ids) for r in results)
    in_tokens = sum(len(p) for p in prompts)
    assert out_tokens == opts.num_requests * opts.output_len, "every request generates exactly output_len tokens"
    n_params = sum(p.numel() for p in {id(p): p for p in engine.model.parameters()}.values())
    bytes_per_token = cache.bytes_per_block(engine.args, 1, engine.dtype)
    mean_len = (in_tokens + out_tokens) / opts.num_requests
    contiguous_len = opts.max_prompt + opts.output_len  # a static cache reserves the longest request per row
    allocated = sched.kv_slots_allocated - alloc0
    row = {"bench": "throughput", **engine_row(engine, name, warmup_s),
           "num_requests": opts.num_requests, "prompt_lens": f"{opts.min_prompt}-{opts.max_prompt}",
           "output_len": opts.output_len, "elapsed_s": elapsed, "output_tok_per_s": out_tokens / elapsed,
           "total_tok_per_s": (in_tokens + out_tokens) / elapsed, "steps": sched.num_steps - steps0,
           "preemptions": engine.metrics.extra["preemptions"],
           "tflop_per_s": 2 * n_params * (in_tokens + out_tokens) / elapsed / 1e12,
           "peak_mem_gb": engine.metrics.peak_memory_bytes / 1e9,
           # memory: slots allocated but not holding a token, averaged over steps (at most one partial
           # block per sequence), against a contiguous cache reserving the longest request for each row
           "kv_waste_fraction": 1 - (sched.kv_tokens_stored - stored0) / max(allocated, 1),
           "contiguous_waste_fraction": 1 - mean_len / contiguous_len,
           "peak_kv_blocks_used": sched.peak_used_blocks,
           "max_concurrent_seqs_paged": int(cache.capacity_tokens // (mean_len + cache.block_size / 2)),
           "max_concurrent_seqs_contiguous": int(cache.capacity_tokens // contiguous_len),
           "kv_bytes_per_token": bytes_per_token}
    row["matmul_peak_tflop_per_s"] = matmul_peak(engine.device, engine.dtype)
    if ref:
        row.update(ref)
        if ref["ref_output_tokens"]:
            row["speedup_vs_ref"] = row["output_tok_per_s"] / row["ref_output_tok_per_s"]
    return row


def reference_throughput(model, prompts, output_len) -> dict:
    """transformers' own continuous batching (generate_batch, paged cache) on the same weights."""
    from transformers import GenerationConfig

    ref = transformers_model(model)
    cfg = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    device = next(ref.parameters()).device
    try:
        ref.generate_batch(inputs=prompts[:4], generation_config=cfg)  # its own warm-up (graph capture)
        sync(device)
        t = time.perf_counter()
        # (no inference_mode here: its worker thread updates tensors made in this call outside of it)
        out = ref.generate_batch(inputs=prompts, generation_config=cfg)
        sync(device)
    except Exception as e:  # report, do not lose our own figures
        return {"ref_error": f"{type(e).__name__}: {e}"[:300], "ref_output_tokens": 0}
    elapsed = time.perf_counter() - t
    tokens = sum(len(o.generated_tokens) for o in out.values())
    row = {"ref_output_tok_per_s": tokens / elapsed, "ref_elapsed_s": elapsed, "ref_output_tokens": tokens}
    if tokens != len(prompts) * output_len:
        row["ref_error"] = f"transformers returned {len(out)} of {len(prompts)} requests, {tokens} tokens"
    return row


def percentiles(values, ps=(50, 95, 99)) -> dict:
    if not values:
        return {f"p{p}": None for p in ps}
    t = torch.tensor(values, dtype=torch.float64)
    return {f"p{p}": float(torch.quantile(t, p / 100)) for p in ps}


def bench_serve(opts) -> list[dict]:
    """Online serving: Poisson arrivals at each rate; TTFT and time-between-tokens percentiles,
    throughput, and goodput (requests per second meeting both the TTFT and the TBT objective)."""
    engine, name, warmup_s = serving_engine(opts)
    rows = []
    for rate in [float(r) for r in opts.rates.split(",")]:
        prompts = random_requests(opts.num_requests, opts.min_prompt, opts.max_prompt, engine.args.vocab_size, seed=1)
        g = torch.Generator().manual_seed(2)
        gaps = torch.empty(opts.num_requests).exponential_(rate, generator=g).tolist()  # exponential gaps at `rate` req/s
        arrivals = [sum(gaps[:i + 1]) for i in range(opts.num_requests)]
        params = SamplingParams(max_new_tokens=opts.output_len, ignore_eos=True)
        requests, i = [], 0
        t0 = time.perf_counter()
        while i < len(prompts) or engine.scheduler.has_work():
            now = time.perf_counter() - t0
            while i < len(prompts) and arrivals[i] <= now:
                r = engine.submit(prompts[i], params)
                r.metrics.arrival = t0 + arrivals[i]  # latency counts from the arrival, not from our loop
                requests.append(r)
                i += 1
            if engine.scheduler.has_work():
                engine.step()
            elif i < len(prompts):
                time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
        elapsed = time.perf_counter() - t0
        ttft = [r.metrics.ttft_s for r in requests]
        tbt = [x for r in requests for x in r.metrics.tbt_s]
        mean_tbt = [sum(r.metrics.tbt_s) / max(len(r.metrics.tbt_s), 1) for r in requests]
        good = sum(1 for a, b in zip(ttft, mean_tbt) if a <= opts.ttft_slo and b <= opts.tbt_slo)
        rows.append({"bench": "serve", **engine_row(engine, name, warmup_s), "rate_req_per_s": rate,
                     "num_requests": opts.num_requests, "output_len": opts.output_len, "elapsed_s": elapsed,
                     "output_tok_per_s": sum(len(r.seqs[0].token_ids) for r in requests) / elapsed,
                     **{f"ttft_{k}_s": v for k, v in percentiles(ttft).items()},
                     **{f"tbt_{k}_s": v for k, v in percentiles(tbt).items()},
                     "ttft_slo_s": opts.ttft_slo, "tbt_slo_s": opts.tbt_slo,
                     "goodput_req_per_s": good / elapsed, "slo_attainment": good / len(requests)})
    return rows


def bench_prefix(opts) -> list[dict]:
    """A shared system prompt of --prefix-len tokens before each request's own question: TTFT of each
    request (one at a time, after one warm request) with the prefix cache and without it."""
    engine, name, warmup_s = serving_engine(opts)
    vocab = engine.args.vocab_size
    g = torch.Generator().manual_seed(3)
    system = torch.randint(100, vocab - 100, (opts.prefix_len,), generator=g).tolist()
    questions = [torch.randint(100, vocab - 100, (opts.suffix_len,), generator=g).tolist() for _ in range(opts.num_requests + 1)]
    params = SamplingParams(max_new_tokens=opts.output_len, ignore_eos=True)
    rows, outputs = [], []
    for caching in (True, False):
        sched = engine.scheduler
        sched.prefix_caching = caching
        sched.cache.allocator.reset_prefix_cache()
        ttfts = []
        outputs.append([])
        for q in questions:
            r = engine.submit(system + q, params)
            while not r.finished:
                engine.step()
            ttfts.append(r.metrics.ttft_s)
            outputs[-1].append(r.seqs[0].token_ids)
        rows.append({"bench": "prefix", **engine_row(engine, name, warmup_s), "prefix_caching": caching,
                     "prefix_len": opts.prefix_len, "suffix_len": opts.suffix_len, "num_requests": opts.num_requests,
                     "mean_ttft_s": sum(ttfts[1:]) / opts.num_requests, **{f"ttft_{k}_s": v for k, v in percentiles(ttfts[1:]).items()},
                     "first_request_ttft_s": ttfts[0]})
    rows[0]["ttft_speedup"] = rows[1]["mean_ttft_s"] / rows[0]["mean_ttft_s"]
    rows[0]["identical_outputs"] = outputs[0] == outputs[1]
    return rows


# ---------------------------------------------------------------- decode GEMVs (gemv.py) in isolation

GEMV_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
               "lm_head": (128256, 4096)}  # llama-3-8b (N, K); the first four once in each of its 32 layers
GEMV_LAYERS = 32
GEMV_MODEL = {  # whole-model variant -> (kernel of the layers, kernel of lm_head; int8 in every quantize mode)
    "bf16 cublas": ("bf16 cublas", "bf16 cublas"), "bf16 triton": ("bf16 triton", "bf16 triton"),
    "int8 today": ("int8 dequant+cublas", "int8 dequant+cublas"), "int8 triton": ("int8 triton", "int8 triton"),
    "int4 today": ("int4 tinygemm", "int8 dequant+cublas"), "int4 triton": ("int4 triton", "int8 triton"),
    # ceilings (cuda only): a kernel that only reads the same bytes, once per layer shape
    "bf16 read": ("read bf16 bytes", "read bf16 bytes"), "int8 read": ("read int8 bytes", "read int8 bytes"),
    "int4 read": ("read int4 bytes", "read int8 bytes")}


def random_gemv_weights(op, N, K, copies, device, g):
    """copies of random llama-like weights for op "bf16" or "int8": ([w], [scales]; None scales for bf16)."""
    if op == "bf16":
        return ([(torch.randn(N, K, device=device, generator=g) * 0.02).to(torch.bfloat16) for _ in range(copies)],
                [None] * copies)
    return ([torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8, generator=g) for _ in range(copies)],
            [(torch.rand(N, device=device, generator=g) * 2e-4 + 1e-4).to(torch.bfloat16) for _ in range(copies)])


def gemv_cases(N, K, M, group_size, device, min_bytes, ref_rows=2048):
    """One decode shape: x [M, K] and, per kernel, (name, call(i) -> y [M, N] on weight copy i, bytes of
    weights and scales one call reads, number of copies, reference fp32 [M, ref_rows] of copy 0's first
    rows). Each kernel cycles through copies that together hold >= min_bytes, so L2 cannot serve a weight
    the second time round. Random weights; the int4 kernels read the same codes, scales and zeros."""
    import torch.nn.functional as F

    import gemv
    from quantize import _inner_k_tiles

    g = torch.Generator(device=device).manual_seed(N + K)
    x = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16)
    R = min(N, ref_rows)

    def n_copies(nbytes):
        return max(1, -(-min_bytes // nbytes))

    cases = []
    n = n_copies(N * K * 2)
    w, _ = random_gemv_weights("bf16", N, K, n, device, g)
    ref = x.float() @ w[0][:R].float().t()
    cases.append(("bf16 cublas", lambda i: F.linear(x, w[i]), N * K * 2, n, ref))
    cases.append(("bf16 triton", lambda i: gemv.bf16_linear(x, w[i]), N * K * 2, n, ref))

    n8 = n_copies(N * K)
    q8, s8 = random_gemv_weights("int8", N, K, n8, device, g)
    ref8 = x.float() @ (q8[0][:R].float() * s8[0][:R].float()[:, None]).t()
    bytes8 = N * K + 2 * N
    cases.append(("int8 dequant+cublas", lambda i: F.linear(x, q8[i].to(torch.bfloat16)) * s8[i], bytes8, n8, ref8))
    cases.append(("int8 triton", lambda i: gemv.int8_linear(x, q8[i], s8[i]), bytes8, n8, ref8))

    G = group_size
    bytes4 = N * K // 2 + N * (K // G) * 4
    n4 = n_copies(bytes4)
    packed = [torch.randint(0, 256, (N, K // 2), device=device, dtype=torch.uint8, generator=g) for _ in range(n4)]
    sz = [torch.stack([torch.rand(N, K // G, device=device, generator=g) * 2e-3 + 1e-3,
                       torch.randn(N, K // G, device=device, generator=g) * 1e-2], dim=-1).to(torch.bfloat16)
          for _ in range(n4)]
    if device.type == "cuda":  # tinygemm: the same codes, element 2i in the high nibble (quantize.pack_int4)
        tiny = [torch.ops.aten._convert_weight_to_int4pack(((p & 0x0F) << 4) | (p >> 4), _inner_k_tiles(K))
                for p in packed]
        sz_t = [s.transpose(0, 1).contiguous() for s in sz]  # [K/G, N, 2]
    p0 = packed[0][:R]
    codes = torch.stack([p0 & 0x0F, p0 >> 4], dim=-1).reshape(R, K).float()
    w4 = (codes.reshape(R, K // G, G) - 8) * sz[0][:R, :, :1].float() + sz[0][:R, :, 1:].float()
    ref4 = x.float() @ w4.reshape(R, K).t()
    if device.type == "cuda":  # (the CPU kernel wants another packing; CPU runs are smoke tests)
        cases.append(("int4 tinygemm", lambda i: torch.ops.aten._weight_int4pack_mm(x, tiny[i], G, sz_t[i]),
                      bytes4, n4, ref4))
    cases.append(("int4 triton", lambda i: gemv.int4_linear(x, packed[i], sz[i], G), bytes4, n4, ref4))
    return cases


def gemv_config_rows(shape, M, device, min_bytes, copy_gb_s) -> list[dict]:
    """--all-configs: every gemv.py candidate of the bf16 and int8 ops for one shape and M, each timed the
    way time_per_call times a kernel (gemv.time_in_graph, as the tuner times its candidates),
    with its error against dequantize + F.linear."""
    import gemv

    N, K = GEMV_SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(N + K + M)
    x = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16)
    rows = []
    for op, nbytes in (("bf16", 2 * N * K), ("int8", N * K + 2 * N)):
        n = max(1, -(-min_bytes // nbytes))
        ws, ss = random_gemv_weights(op, N, K, n, device, g)
        ref = gemv._run_dense(x, ws[0], ss[0], gemv.DEQUANT).float()
        for cfg in gemv.candidates(op, M, K):
            err = ((gemv._run_dense(x, ws[0], ss[0], cfg).float() - ref).abs().max() / ref.abs().max()).item()
            us = time_per_call(lambda i: gemv._run_dense(x, ws[i], ss[i], cfg), n, nbytes)
            rows.append({"bench": "gemv_config", "shape": shape, "N": N, "K": K, "M": M, "op": op,
                         "config": "/".join(map(str, cfg)), "us": us, "gb_per_s": nbytes / us / 1e3,
                         "bw_fraction": nbytes / us / 1e3 / copy_gb_s, "max_rel_err": err})
        del ws, ss
    return rows


def time_per_call(call, copies: int, bytes_per_call: int) -> float:
    """Microseconds per call, from a CUDA graph of many calls cycling through the weight copies
    (gemv.time_in_graph, as gemv's tuner times its configs). The first, eager calls compile and tune
    gemv's configs before. On CPU (a smoke test under TRITON_INTERPRET=1) it times one eager call."""
    import gemv

    if not torch.cuda.is_available():
        call(0)
        t = time.perf_counter()
        call(0)
        return (time.perf_counter() - t) * 1e6
    calls = min(400, max(20, -(-4_000_000_000 // bytes_per_call)))
    calls = -(-calls // copies) * copies
    for i in range(copies):
        call(i)
    return gemv.time_in_graph(call, copies, calls) * 1e3


@functools.cache
def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(src_ptr, out_ptr, n_words, PER: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # program p XORs words p * PER .. (p + 1) * PER - 1 of src, BLOCK words a step (each step's loads all
        # in flight at once); with PDL it waits for the kernel before only after its last load, as a GEMV
        # that read every weight before touching x would
        base = tl.program_id(0).to(tl.int64) * PER
        acc = tl.zeros((BLOCK,), tl.int32)
        for i in range(0, PER, BLOCK):
            offs = base + i + tl.arange(0, BLOCK)
            acc ^= tl.load(src_ptr + offs, mask=offs < n_words, other=0)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))

    return read_kernel


READ_CONFIGS = [(4096, 4096, 4), (8192, 4096, 4), (16384, 4096, 4), (32768, 4096, 4), (16384, 8192, 8),
                (8192, 2048, 2)]  # (words a program, words a step, warps)


def read_ceiling(nbytes: int, device, min_bytes: int) -> tuple[float, tuple, int]:
    """Microseconds to read nbytes with a plain streaming kernel (no math), timed like the GEMVs
    (time_per_call: back to back in a CUDA graph over copies past L2, with PDL where the GEMVs have it):
    the best of READ_CONFIGS -> (us, config, copies read). What a GEMV of that many bytes could take at
    most, kernel boundaries included."""
    import gemv

    words = -(-nbytes // 4)
    copies = max(1, -(-min_bytes // nbytes))
    src = torch.randint(-2**31, 2**31 - 1, (copies, words), dtype=torch.int32, device=device)
    out = torch.empty(words // min(c[0] for c in READ_CONFIGS) + 1, dtype=torch.int32, device=device)
    pdl = {k: v for k, v in gemv._pdl_args(device).items() if k in ("PDL", "launch_pdl")}  # as the GEMVs launch
    best = (float("inf"), None)
    for per, block, warps in READ_CONFIGS:
        grid = (-(-words // per),)
        us = time_per_call(lambda i: _read_kernel()[grid](src[i], out, words, PER=per, BLOCK=block,
                                                          num_warps=warps, **pdl), copies, nbytes)
        best = min(best, (us, (per, block, warps)))
    del src
    return best + (copies,)


def bench_gemv(opts) -> list[dict]:
    """llama-3-8b decode GEMVs, one kernel at a time: cuBLAS bf16, gemv.py's bf16/int8/int4 Triton kernels,
    today's int8 (bf16 copy + cuBLAS) and int4 (tinygemm). GB/s of weight and scale bytes read beside the
    copy bandwidth of the same run; then the per-token sum over 32 layers + lm_head per variant."""
    import os

    import gemv

    os.environ.setdefault("FLINT_GEMV_CACHE", "0")  # time every shape's candidates (gemv_tune rows), not stored picks
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("bench.py gemv needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not gemv.available(device):
        raise ValueError("bench.py gemv needs triton (pip install triton)")
    shapes = opts.shapes.split(",")
    unknown = [s for s in shapes if s not in GEMV_SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)} (choose from {', '.join(GEMV_SHAPES)})")
    copy_gb_s = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    rows, times, ceilings = [], {}, {}

    def row(shape, M, kernel, us, nbytes, err, cfg, copies):
        N, K = GEMV_SHAPES[shape]
        return {"bench": "gemv", "device": name, "shape": shape, "N": N, "K": K, "M": M, "kernel": kernel,
                "group_size": opts.group_size if kernel.startswith("int4") else None, "us": us,
                "gb_per_s": nbytes / us / 1e3, "copy_gb_per_s": copy_gb_s, "bw_fraction": nbytes / us / 1e3 / copy_gb_s,
                "max_rel_err": err, "config": str(cfg) if cfg else None, "weight_copies": copies}

    for M in [int(m) for m in opts.batch_sizes.split(",")]:
        for shape in shapes:
            N, K = GEMV_SHAPES[shape]
            cases = gemv_cases(N, K, M, opts.group_size, device, opts.min_mb << 20)
            for kernel, call, nbytes, copies, ref in cases:
                err = ((call(0)[:, :ref.shape[1]].float() - ref).abs().max() / ref.abs().max()).item()
                us = time_per_call(call, copies, nbytes)
                times[M, shape, kernel] = us
                op = {"bf16 triton": "bf16", "int8 triton": "int8", "int4 triton": "int4"}.get(kernel)
                cfg = gemv.config_for(op, M, N, K, opts.group_size if op == "int4" else 0, device) if op else None
                rows.append(row(shape, M, kernel, us, nbytes, err, cfg, copies))
            del cases
            if device.type == "cuda":  # the ceiling beside them: the same bytes read by a kernel that only reads
                for label, nbytes in (("bf16", N * K * 2), ("int8", N * K + 2 * N),
                                      ("int4", N * K // 2 + N * (K // opts.group_size) * 4)):
                    if nbytes not in ceilings:
                        ceilings[nbytes] = read_ceiling(nbytes, device, opts.min_mb << 20)
                    us, cfg, copies = ceilings[nbytes]
                    times[M, shape, f"read {label} bytes"] = us
                    rows.append(row(shape, M, f"read {label} bytes", us, nbytes, 0.0, cfg, copies))
            if opts.all_configs:
                rows += gemv_config_rows(shape, M, device, opts.min_mb << 20, copy_gb_s)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if set(GEMV_SHAPES) <= set(shapes):
            base = None
            for variant, (body, head) in GEMV_MODEL.items():
                if (M, "lm_head", body) not in times or (M, "lm_head", head) not in times:
                    continue
                layers = sum(times[M, s, body] for s in ("qkv", "o", "gate_up", "down"))
                us = GEMV_LAYERS * layers + times[M, "lm_head", head]
                base = base or us
                rows.append({"bench": "gemv_model", "device": name, "M": M, "variant": variant, "layer_kernel": body,
                             "lm_head_kernel": head, "gemv_us_per_step": us, "tok_per_s": M / us * 1e6,
                             "speedup_vs_bf16_cublas": base / us})
    for (op, M, N, K, gs, _), (cfg, timed) in sorted(gemv.tuning_log().items(), key=lambda kv: str(kv[0])):
        if timed:
            rows.append({"bench": "gemv_tune", "op": op, "M": M, "N": N, "K": K, "group_size": gs or None,
                         "best": str(cfg),
                         "us": {str(c): round(ms * 1e3, 2) for c, ms in sorted(timed.items(), key=lambda t: t[1])}})
    return rows


def format_gemv(rows) -> str:
    lines = [f"{'shape':<8} {'M':>2} {'kernel':<20} {'us':>8} {'GB/s':>7} {'of copy':>7} {'max err':>8}  config"]
    for r in rows:
        if r["bench"] == "gemv":
            lines.append(f"{r['shape']:<8} {r['M']:>2} {r['kernel']:<20} {r['us']:8.2f} {r['gb_per_s']:7.0f} "
                         f"{r['bw_fraction']:7.2f} {r['max_rel_err']:8.1e}  {r['config'] or ''}")
    copy = next((r["copy_gb_per_s"] for r in rows if r["bench"] == "gemv"), 0)
    lines.append(f"copy bandwidth (read + write) {copy:.0f} GB/s; GB/s counts weight and scale bytes read")
    model = [r for r in rows if r["bench"] == "gemv_model"]
    if model:
        lines.append(f"\nllama-3-8b, {GEMV_LAYERS} layers + lm_head (lm_head int8 in int8/int4 variants), GEMVs only:")
        lines.append(f"{'M':>2} {'variant':<12} {'us/step':>8} {'tok/s':>8} {'vs bf16 cublas':>15}")
        for r in model:
            lines.append(f"{r['M']:>2} {r['variant']:<12} {r['gemv_us_per_step']:8.0f} {r['tok_per_s']:8.0f} "
                         f"{r['speedup_vs_bf16_cublas']:14.2f}x")
    configs = [r for r in rows if r["bench"] == "gemv_config"]
    if configs:
        lines.append("\nevery candidate config (--all-configs), fastest first per shape, op and M:")
        configs.sort(key=lambda r: (r["shape"], r["op"], r["M"], r["us"]))
        for r in configs:
            lines.append(f"{r['shape']:<8} {r['M']:>2} {r['op']:<5} {r['config']:<26} {r['us']:8.2f} "
                         f"{r['bw_fraction']:7.2f} {r['max_rel_err']:8.1e}")
    tune = [r for r in rows if r["bench"] == "gemv_tune"]
    if tune:
        lines.append("\ngemv configs timed at first call (us, L2 flushed), fastest first:")
        for r in tune:
            timed = ", ".join(f"{c} {t}" for c, t in r["us"].items())
            lines.append(f"{r['op']} M={r['M']} N={r['N']} K={r['K']}: {timed}")
    return "\n".join(lines)


def print_row(row, as_json):
    if as_json:
        def rounded(v):
            return round(v, 4) if isinstance(v, float) else [rounded(x) for x in v] if isinstance(v, list) else \
                {k: rounded(x) for k, x in v.items()} if isinstance(v, dict) else v
        print(json.dumps(rounded(row)), flush=True)
        return
    width = max(len(k) for k in row)
    for k, v in row.items():
        if k == "profile":
            print("profile (per decode step):")
            for r in v:
                print(f"  {r['us_per_step']:10.1f} us  {r['share_of_step']:6.1%}  {r['calls_per_step']:7.1f} calls  {r['kernel']}")
            continue
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(flush=True)


def at_least(low: int):
    """argparse type: an integer >= low (a count of rows, tokens or repeats), else a usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    d = sub.add_parser("decode", help="batch decode speed vs copy bandwidth and transformers")
    d.add_argument("--preset", choices=sorted(PRESETS), default=None, help="random weights in a real shape")
    d.add_argument("--model", default=None, help="anything generate.py loads (default: the embedded SmolLM2)")
    d.add_argument("--batch-size", type=at_least(1), default=1)
    d.add_argument("--prompt-len", type=at_least(1), default=128)
    d.add_argument("--new-tokens", type=at_least(1), default=256)
    d.add_argument("--device", default="auto")
    d.add_argument("--dtype", default="auto")
    d.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled decode (default: on for cuda, off for cpu)")
    d.add_argument("--repeats", type=at_least(1), default=3)
    d.add_argument("--no-ref", action="store_true", help="skip the transformers reference")
    d.add_argument("--quant", choices=["int8", "int4", "gguf"], default=None, help="weight-only quantization")
    d.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128), help="int4 group size")
    d.add_argument("--quant-head", default=None, choices=["int8", "int4", "none"],
                   help="lm_head with --quant int8/int4: int8 (default), int4 (every linear int4, as gpt-fast) or none")
    d.add_argument("--profile", type=at_least(1), default=0, metavar="TOP",
                   help="also profile decode (torch.profiler) and report the TOP kernels' time per step")
    d.add_argument("--json", action="store_true")
    q = sub.add_parser("quality", help="perplexity of the embedded SmolLM2: fp32, bf16, int8, int4 RTN/GPTQ/AWQ")
    q.add_argument("--device", default="auto")
    q.add_argument("--json", action="store_true")
    s = sub.add_parser("speculative", help="speculative decoding: acceptance and speedup over target-only, same run")
    s.add_argument("--model", default=None, help="target (default: the embedded SmolLM2)")
    s.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="target with random weights in a real shape, random prompt (measures round cost)")
    s.add_argument("--prompt-len", type=at_least(1), default=128, help="with --preset")
    s.add_argument("--drafter", choices=["prompt-lookup", "self", "self-int4", "draft"], default="prompt-lookup",
                   help="self: a layer-skipping view of the target; self-int4: an int4 copy of the target")
    s.add_argument("--draft", default=None, metavar="MODEL",
                   help="draft model for --drafter draft: a path or repo id, or a preset name (random weights)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled steps + CUDA graphs (default: on for CUDA)")
    s.add_argument("-k", type=at_least(1), default=8, help="draft tokens per round to start from")
    s.add_argument("--fixed-k", action="store_true", help="no adaptive k")
    s.add_argument("--new-tokens", type=at_least(1), default=400)
    s.add_argument("--repeats", type=at_least(1), default=2)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--no-ref", action="store_true", help="skip transformers' prompt-lookup decoding")
    s.add_argument("--json", action="store_true")
    f = sub.add_parser("prefill", help="time to first token for long prompts")
    f.add_argument("--preset", choices=sorted(PRESETS), default="llama-3-8b")
    f.add_argument("--prompt-lens", default="128,1024,4096,32768")
    f.add_argument("--device", default="auto")
    f.add_argument("--dtype", default="auto")
    f.add_argument("--repeats", type=at_least(1), default=3)
    f.add_argument("--json", action="store_true")
    for cmd, helptext in (("throughput", "continuous batching: offline throughput vs transformers' generate_batch"),
                          ("serve", "continuous batching: Poisson arrivals, latency percentiles and goodput"),
                          ("prefix", "continuous batching: TTFT with and without the prefix cache")):
        c = sub.add_parser(cmd, help=helptext)
        c.add_argument("--preset", choices=sorted(PRESETS), default=None, help="random weights in a real shape")
        c.add_argument("--model", default=None, help="anything generate.py loads (default: the embedded SmolLM2)")
        c.add_argument("--device", default="auto")
        c.add_argument("--dtype", default="auto")
        c.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="compiled decode steps, CUDA graphs per batch bucket (default: on for cuda)")
        c.add_argument("--kv-tokens", type=at_least(1), default=None, help="KV pool size in tokens (default: from GPU memory)")
        c.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        c.add_argument("--block-size", type=at_least(1), default=64)
        c.add_argument("--max-batch", type=at_least(1), default=None)
        c.add_argument("--max-tokens-per-step", type=at_least(1), default=None)
        c.add_argument("--no-overlap", action="store_true", help="read each decode step back before queuing the next")
        c.add_argument("--num-requests", type=at_least(1), default={"throughput": 256, "serve": 200, "prefix": 16}[cmd])
        c.add_argument("--min-prompt", type=at_least(1), default=64)
        c.add_argument("--max-prompt", type=at_least(1), default=512)
        c.add_argument("--output-len", type=at_least(1), default={"throughput": 256, "serve": 128, "prefix": 16}[cmd])
        c.add_argument("--json", action="store_true")
        if cmd == "throughput":
            c.add_argument("--no-ref", action="store_true", help="skip transformers' generate_batch")
        if cmd == "serve":
            c.add_argument("--rates", default="2,8,32", help="request rates to try (requests/s, Poisson)")
            c.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT objective for goodput (s)")
            c.add_argument("--tbt-slo", type=float, default=0.05, help="mean time-between-tokens objective (s)")
        if cmd == "prefix":
            c.add_argument("--prefix-len", type=at_least(1), default=1000)
            c.add_argument("--suffix-len", type=at_least(0), default=32)
    v = sub.add_parser("gemv", help="decode GEMV kernels (cuBLAS, gemv.py, tinygemm) on llama-3-8b shapes (CUDA)")
    v.add_argument("--batch-sizes", default="1,8", help="rows of x (M) to time")
    v.add_argument("--shapes", default=",".join(GEMV_SHAPES), help="subset of qkv,o,gate_up,down,lm_head")
    v.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128), help="int4 group size")
    v.add_argument("--min-mb", type=at_least(0), default=256, help="weight copies per kernel hold at least this many MiB (L2 is 50 MB)")
    v.add_argument("--all-configs", action="store_true",
                   help="also time every candidate config of the bf16 and int8 kernels (slow: compiles them all)")
    v.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    try:
        if opts.bench == "decode":
            print_row(bench_decode(opts), opts.json)
        elif opts.bench == "quality":
            rows = quality_table(device=str(pick_device(opts.device)))
            if opts.json:
                for row in rows:
                    print_row(row, True)
            else:
                print(format_quality(rows))
        elif opts.bench == "speculative":
            print_row(bench_spec(opts), opts.json)
        elif opts.bench == "prefill":
            for row in bench_prefill(opts):
                print_row(row, opts.json)
        elif opts.bench == "throughput":
            print_row(bench_throughput(opts), opts.json)
        elif opts.bench == "serve":
            for row in bench_serve(opts):
                print_row(row, opts.json)
        elif opts.bench == "prefix":
            for row in bench_prefix(opts):
                print_row(row, opts.json)
        elif opts.bench == "gemv":
            rows = bench_gemv(opts)
            if opts.json:
                for row in rows:
                    print_row(row, True)
            else:
                print(format_gemv(rows))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
