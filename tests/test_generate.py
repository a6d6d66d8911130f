"""The CLI as a user runs it: output format, streaming, reports, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import pytest

import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *argv):
    code = generate.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_flags():
    p = subprocess.run([sys.executable, "generate.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0
    for flag in ("--model", "--chat", "--interactive", "--prompts-file", "--jsonl", "--temperature", "--top-k",
                 "--top-p", "--min-p", "--repetition-penalty", "--seed", "--stop", "--device", "--dtype",
                 "--compile", "--profile", "--memory-report", "--max-new-tokens"):
        assert flag in p.stdout


def test_default_model_streams_and_logs_timings(capsys, smollm2_path):
    code, out, err = run_cli(capsys, "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert code == 0
    assert "Paris" in out
    assert "TTFT" in err and "tok/s" in err and "peak memory" in err


def test_jsonl_batch_prints_only_json(capsys, tmp_path, engine):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Héllo wörld 🙂"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "--prompts-file", str(f), "--jsonl", "--max-new-tokens", "12", "--quiet")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:
        assert set(r) == {"prompt", "text", "token_ids", "finish_reason"}
        assert r["text"] == engine.tokenizer.decode(r["token_ids"])  # EOS ends a row and is not in it
    # the batch gives each prompt the tokens it gets alone
    from sampling import SamplingParams
    alone = engine.generate([prompts[1]], SamplingParams(max_new_tokens=12))[0]
    assert rows[1]["token_ids"] == alone.token_ids


def test_memory_report_and_profile(capsys, tmp_path, smollm2_path):
    code, out, err = run_cli(capsys, "--prompt", "Hi", "--max-new-tokens", "4", "--memory-report",
                             "--profile", str(tmp_path / "trace"))
    assert code == 0
    assert "weights" in err and "KV cache" in err and "peak" in err
    assert os.path.getsize(tmp_path / "trace" / "trace.json") > 1000


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "sampling parameter temperature=-1.0 is invalid"),
    (["--top-p", "1.5"], "sampling parameter top_p=1.5 is invalid"),
    (["--top-k", "-3"], "sampling parameter top_k=-3 is invalid"),
    (["--max-new-tokens", "0"], "sampling parameter max_new_tokens=0 is invalid"),
    (["--model", "/no/such/dir"], "model path '/no/such/dir' does not exist"),
    (["--prompts-file", "/no/such/file.txt"], "cannot read --prompts-file /no/such/file.txt"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--device", "tpu"], "unknown --device 'tpu' (choose from auto, cpu, cuda, cuda:N)"),
    (["--device", "mps"], "unknown --device 'mps'"),  # torch knows it, flint does not run there
    (["--max-seq-len", "0"], "--max-seq-len 0: must be a positive integer"),
    (["--prompt-lookup", "--speculate-k", "0"], "speculate k=0 is invalid"),  # 0 silently meant the default
    (["--quant-head", "int4"], "--quant-head goes with --quant int8 or int4"),
    (["--device", "cuda:7"], None),  # CUDA missing here; on a GPU machine, a missing device
])
def test_bad_input_is_one_line_error(capsys, argv, message):
    if argv == ["--device", "cuda:7"]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA machine")
        message = "CUDA is not available"
    code, out, err = run_cli(capsys, "--prompt", "hi", "--quiet", *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unsupported_group_size_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage line and one error line, no model loaded first
        generate.main(["--prompt", "hi", "--quant", "int4", "--group-size", "48"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--group-size: invalid choice: 48 (choose from 32, 64, 128)" in err
    assert "loading" not in err and "Traceback" not in err


def test_unknown_head_quantization_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--prompt", "hi", "--quant", "int4", "--quant-head", "int2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--quant-head: invalid choice: 'int2'" in err and "Traceback" not in err


def test_prompt_longer_than_context_is_a_clear_error(capsys, smollm2_path):
    code, out, err = run_cli(capsys, "--prompt", "word " * 100, "--max-seq-len", "32", "--quiet")
    assert code == 2
    assert "prompt has 101 tokens but the context is 32 tokens" in err or "prompt has" in err
    assert "Traceback" not in err


def test_corrupt_model_file_subprocess_no_traceback(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    p = subprocess.run([sys.executable, "generate.py", "--model", str(bad), "--prompt", "hi"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: ") and "broken.gguf" in p.stderr
    assert "Traceback" not in p.stderr


def test_interactive_chat_two_turns(smollm2_path):
    p = subprocess.run([sys.executable, "generate.py", "--interactive", "--max-new-tokens", "20", "--quiet"],
                       cwd=ROOT, input="My name is Ada.\nWhat is my name?\n\n", capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Ada" in p.stdout


def test_prompts_file_runs_continuous_batching_and_reports_a_rejected_prompt(capsys, smollm2_path, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\n" + "word " * 600 + "\nWater boils at\n")
    code, out, err = run_cli(capsys, "--prompts-file", str(prompts), "--jsonl", "--max-new-tokens", "8",
                             "--max-seq-len", "512", "--kv-tokens", "2048", "--block-size", "16")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["finish_reason"] for r in rows] == ["length", "error", "length"]
    assert "context is 512 tokens" in rows[1]["error"] and rows[0]["text"] and rows[2]["text"]
    [static] = [json.loads(line) for line in run_cli(capsys, "--prompt", "The capital of France is", "--jsonl",
                                                     "--max-new-tokens", "8")[1].splitlines()]
    assert static["token_ids"] == rows[0]["token_ids"]


def test_prompts_file_compiles_its_decode_steps_before_the_clock_starts(capsys, smollm2_path, tmp_path, monkeypatch):
    # the paged decode step compiles per batch bucket: generate.py compiles the buckets its prompts can fill
    # (1 and 2 rows here, not max_batch's) before timing, so "decode tok/s" is decoding, not compilation
    import scheduler
    buckets = []
    forward = scheduler.GraphedForward.__call__
    monkeypatch.setattr(scheduler.GraphedForward, "__call__", lambda self, tokens, input_pos: (
        buckets.append(tokens.shape[0]), forward(self, tokens, input_pos))[1])
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nWater boils at\n")
    code, out, err = run_cli(capsys, "--prompts-file", str(prompts), "--jsonl", "--max-new-tokens", "4",
                             "--max-seq-len", "512", "--kv-tokens", "2048", "--block-size", "16")
    assert code == 0 and len(out.splitlines()) == 2
    assert "compiled the paged decode step for up to 2 sequences" in err
    assert err.index("compiled the paged decode step") < err.index("TTFT")
    assert buckets[:2] == [1, 2] and set(buckets) <= {1, 2}  # the warm-up's two buckets, then the run's


@pytest.mark.parametrize("flags, message", [
    (["--block-size", "24"], "--block-size 24"),
    (["--max-batch", "0"], "--max-batch 0"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5"),
])
def test_bad_pool_options_give_one_line_errors(capsys, smollm2_path, tmp_path, flags, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    code, out, err = run_cli(capsys, "--prompts-file", str(prompts), "--quiet", *flags)
    assert code == 2 and message in err and "Traceback" not in err


def test_speculative_flags_give_plain_greedy_tokens(capsys, tmp_path, engine):
    """--prompt-lookup on a batch (JSONL), eager and with --compile, and on one streamed prompt: the tokens
    plain greedy decoding gives each prompt alone, and a speculative summary on stderr."""
    from sampling import SamplingParams

    prompts = ["Repeat exactly: the quick brown fox jumps over the lazy dog. The quick brown fox jumps",
               "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    want = [engine.generate([p], SamplingParams(max_new_tokens=16))[0] for p in prompts]
    for extra in ([], ["--compile"]):
        code, out, err = run_cli(capsys, "--prompts-file", str(f), "--jsonl", "--max-new-tokens", "16", "--quiet",
                                 "--prompt-lookup", "--speculate-k", "4", *extra)
        assert code == 0, err
        assert [json.loads(line)["token_ids"] for line in out.splitlines()] == [w.token_ids for w in want], extra
    code, out, err = run_cli(capsys, "--prompt", prompts[1], "--max-new-tokens", "16", "--prompt-lookup")
    assert code == 0 and want[1].text in out
    assert "speculative" in err and "acceptance" in err
