"""Shared fixtures: the embedded SmolLM2-135M-Instruct, loaded once per test session."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    # gemv.py's Triton kernels run on CPU through Triton's interpreter (tests/test_gemv.py). It must be on
    # before anything imports triton (torch.compile may, in any test), so it is switched on here, first.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# under pytest-xdist (-n W) each of the W worker processes gets its share of the cores
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
# gemv's tuner (on a GPU) keeps its picks in ~/.cache/flint: the tests tune afresh and leave the user's file alone
os.environ["FLINT_GEMV_CACHE"] = "0"


@pytest.fixture(autouse=True)
def _same_random_numbers_in_any_order():
    """Every test starts from the same global RNG state, whichever tests ran before it in its process (-n 2
    splits the files between two processes, and a single test can be run alone)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_path():
    from weights import default_model_path
    try:
        return default_model_path()
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def engine(smollm2_path):
    from scheduler import Engine
    return Engine.load(smollm2_path, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own load of the same GGUF (dequantized to fp32): the reference."""
    transformers = pytest.importorskip("transformers")
    d, f = os.path.split(smollm2_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


@pytest.fixture
def tiny_model():
    """tiny_model(args, seed=0): a Transformer with random weights (std 0.3: peaked next-token
    distributions, so greedy comparisons between code paths do not hinge on near-ties)."""
    from model import Transformer

    def make(args, seed=0):
        torch.manual_seed(seed)
        model = Transformer(args).eval().requires_grad_(False)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        return model

    return make
