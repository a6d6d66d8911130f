"""bench.py runs on CPU and prints every key of its JSON (timings themselves are never asserted)."""
import json

import pytest

import bench

DECODE_KEYS = {"tok_per_s", "gb_per_s", "copy_gb_per_s", "bw_fraction", "ttft_s", "prefill_tok_per_s", "compile_s",
               "peak_mem_gb", "ref_tok_per_s", "tflop_per_s", "matmul_peak_tflop_per_s", "speedup_vs_ref"}


def test_decode_smollm2_preset_prints_every_key(capsys):
    code = bench.main(["decode", "--preset", "smollm2-135m", "--device", "cpu", "--prompt-len", "8",
                       "--new-tokens", "4", "--repeats", "1", "--json"])
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert DECODE_KEYS <= set(row)
    assert row["batch_size"] == 1 and row["new_tokens"] == 4 and row["tok_per_s"] > 0


def test_prefill_prints_a_row_per_length(capsys):
    code = bench.main(["prefill", "--preset", "smollm2-135m", "--device", "cpu", "--prompt-lens", "8,16",
                       "--repeats", "1", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt_len"] for r in rows] == [8, 16]
    assert all(r["ttft_s"] > 0 and "matmul_peak_tflop_per_s" in r for r in rows)


@pytest.mark.parametrize("argv,message", [
    (["decode", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["decode", "--repeats", "x"], "argument --repeats: expected an integer, got 'x'"),
    (["speculative", "-k", "0"], "argument -k: must be >= 1, got 0"),
    (["throughput", "--num-requests", "-3"], "argument --num-requests: must be >= 1, got -3"),
    (["gemv", "--min-mb", "-1"], "argument --min-mb: must be >= 0, got -1"),  # 0: no minimum (the tests' tiny shapes)
])
def test_bad_counts_are_usage_errors(capsys, argv, message):
    # counts of rows, tokens and repeats are checked as arguments: a usage error naming the flag, not a
    # traceback from deep inside a run (a batch of 0 failed in min() before)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_decode_profile_reports_kernels_per_step(capsys):
    # --profile: the ops' (CPU) or kernels' (GPU) time per decode step, the step's wall time and the sum first
    code = bench.main(["decode", "--preset", "smollm2-135m", "--device", "cpu", "--prompt-len", "8",
                       "--new-tokens", "4", "--repeats", "1", "--no-ref", "--profile", "3", "--json"])
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = row["profile"]
    assert [r["kernel"] for r in rows[:2]] == ["(step, wall)", "(all kernels)"] and 1 <= len(rows) - 2 <= 3
    assert all(set(r) == {"kernel", "us_per_step", "calls_per_step", "share_of_step"} for r in rows)
    assert all(r["us_per_step"] > 0 for r in rows) and any("mm" in r["kernel"] for r in rows[2:])


def test_decode_ablations_runs_bench_with_pieces_taken_out():
    # benchmarks/decode_ablations.py (BENCHMARKS.md's step costs): an unknown variant is a usage error; known ones
    # patch the step and hand the rest of the command line to bench.py (they run on CPU too, whatever they patch)
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parent.parent / "benchmarks" / "decode_ablations.py")
    bad = subprocess.run([sys.executable, script, "noattn,bogus", "decode"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown variant(s) ['bogus']" in bad.stderr
    bad = subprocess.run([sys.executable, script, "s32w2w3", "decode"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown variant(s) ['s32w2w3']" in bad.stderr  # no traceback from parsing it
    ok = subprocess.run([sys.executable, script, "noglu,nonorm,norope,noadd,s32w2", "decode", "--preset",
                         "smollm2-135m", "--device", "cpu", "--prompt-len", "8", "--new-tokens", "2", "--repeats",
                         "1", "--no-ref", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["tok_per_s"] > 0


def test_bf16_gemv_shapes_says_what_it_needs():
    # benchmarks/bf16_gemv_shapes.py (BENCHMARKS.md's bf16_cu table) is GPU-only: elsewhere, and for rows the
    # kernel does not take, one line saying so (exit 1), no traceback
    import subprocess
    import sys
    from pathlib import Path

    import torch

    script = str(Path(__file__).resolve().parent.parent / "benchmarks" / "bf16_gemv_shapes.py")
    bad = subprocess.run([sys.executable, script, "9"], capture_output=True, text=True)
    assert bad.returncode == 1 and "ROWS must be 1..8, got 9" in bad.stderr and "Traceback" not in bad.stderr
    if not torch.cuda.is_available():
        none = subprocess.run([sys.executable, script], capture_output=True, text=True)
        assert none.returncode == 1 and "needs a CUDA GPU and nvcc" in none.stderr and "Traceback" not in none.stderr
