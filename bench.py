"""Benchmarks. Every figure stands beside its ceiling measured in the same run (copy bandwidth, matmul
peak) and beside the reference implementation (Hugging Face transformers) run on the same weights.

    python bench.py decode --preset llama-3-8b --device cuda            # random weights, real shapes
    python bench.py decode --device cpu --json                          # the embedded SmolLM2 (real weights)
    python bench.py decode --model path/or/repo --batch-size 8

Prints a readable table, or with --json one JSON object per measurement on stdout.
"""
import argparse
import json
import sys
import time

import torch

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
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    compile = opts.compile if opts.compile is not None else device.type == "cuda"
    max_seq_len = opts.prompt_len + opts.new_tokens + 1
    t_start = time.perf_counter()
    if opts.model or opts.preset is None:
        engine = Engine.load(opts.model, device=str(device), dtype=dtype, compile=compile,
                             max_seq_len=max_seq_len, progress=False, quant=opts.quant, group_size=opts.group_size)
        name = opts.model or "smollm2-135m-instruct (embedded GGUF, real weights)"
    else:
        model = random_model(PRESETS[opts.preset], device, dtype)
        if opts.quant:
            quantize_model(model, opts.quant, opts.group_size)
        engine = Engine(model, None, device, dtype, compile=compile, max_seq_len=max_seq_len)
        name = f"{opts.preset} (random weights{', ' + opts.quant if opts.quant else ''})"
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
    if not opts.no_ref and not opts.quant:  # transformers gets the float weights only
        ref = reference_decode(engine.model, prompt.to(device), opts.new_tokens, static_cache=device.type == "cuda")
        row.update(ref)
        row["speedup_vs_ref"] = row["tok_per_s"] / ref["ref_tok_per_s"]
    return row


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
    """Target-only vs speculative on an input-grounded task (copy a passage with corrections), same run."""
    import speculative
    from weights import load_model

    engine = Engine.load(opts.model, device=opts.device, dtype=opts.dtype, progress=False)
    if opts.drafter == "prompt-lookup":
        drafter = speculative.PromptLookupDrafter()
    elif opts.drafter == "self":
        drafter = speculative.self_drafter(engine)
    else:
        if not opts.draft:
            raise ValueError("--drafter draft needs --draft MODEL")
        drafter = speculative.ModelDrafter(load_model(opts.draft, engine.device, engine.dtype, progress=False)[0])
    row = speculative.bench_speculative(engine, drafter, k=opts.k, adaptive=not opts.fixed_k,
                                        new_tokens=opts.new_tokens, repeats=opts.repeats, hf_reference=not opts.no_ref)
    return {"bench": "speculative", "drafter": opts.drafter, "device": str(engine.device), **row}


def print_row(row, as_json):
    if as_json:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        return
    width = max(len(k) for k in row)
    for k, v in row.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    d = sub.add_parser("decode", help="batch decode speed vs copy bandwidth and transformers")
    d.add_argument("--preset", choices=sorted(PRESETS), default=None, help="random weights in a real shape")
    d.add_argument("--model", default=None, help="anything generate.py loads (default: the embedded SmolLM2)")
    d.add_argument("--batch-size", type=int, default=1)
    d.add_argument("--prompt-len", type=int, default=128)
    d.add_argument("--new-tokens", type=int, default=256)
    d.add_argument("--device", default="auto")
    d.add_argument("--dtype", default="auto")
    d.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled decode (default: on for cuda, off for cpu)")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--no-ref", action="store_true", help="skip the transformers reference")
    d.add_argument("--quant", choices=["int8", "int4", "gguf"], default=None, help="weight-only quantization")
    d.add_argument("--group-size", type=int, default=None, help="int4 group size")
    d.add_argument("--json", action="store_true")
    q = sub.add_parser("quality", help="perplexity of the embedded SmolLM2: fp32, bf16, int8, int4 RTN/GPTQ/AWQ")
    q.add_argument("--device", default="auto")
    q.add_argument("--json", action="store_true")
    s = sub.add_parser("speculative", help="speculative decoding: acceptance and speedup over target-only, same run")
    s.add_argument("--model", default=None, help="target (default: the embedded SmolLM2)")
    s.add_argument("--drafter", choices=["prompt-lookup", "self", "draft"], default="prompt-lookup")
    s.add_argument("--draft", default=None, metavar="MODEL", help="draft model for --drafter draft")
    s.add_argument("-k", type=int, default=8, help="draft tokens per round to start from")
    s.add_argument("--fixed-k", action="store_true", help="no adaptive k")
    s.add_argument("--new-tokens", type=int, default=400)
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--no-ref", action="store_true", help="skip transformers' prompt-lookup decoding")
    s.add_argument("--json", action="store_true")
    f = sub.add_parser("prefill", help="time to first token for long prompts")
    f.add_argument("--preset", choices=sorted(PRESETS), default="llama-3-8b")
    f.add_argument("--prompt-lens", default="128,1024,4096,32768")
    f.add_argument("--device", default="auto")
    f.add_argument("--dtype", default="auto")
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--json", action="store_true")
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
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
