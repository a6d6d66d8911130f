"""Tokenizer: text <-> token ids, chat templates, streaming detokenization.

One `Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library transformers uses under the hood), so encode and
decode match transformers by construction once the backend is built the same way. `load_tokenizer` builds it from:
  - a Hugging Face directory with tokenizer.json (+ tokenizer_config.json, generation_config.json, config.json)
  - a Hugging Face directory with only tokenizer.model (sentencepiece BPE: Llama 2 / Mistral), rebuilt the way
    transformers' LlamaTokenizer rebuilds it
  - a GGUF metadata dict (key -> value) for 'gpt2' (byte-level BPE) and 'llama' (sentencepiece BPE) vocabularies,
    rebuilt the way transformers does when it loads a GGUF (AutoTokenizer.from_pretrained(dir, gguf_file=...)).
"""
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

# Turn-end tokens that chat models emit instead of (or besides) their eos token. One of these is added to eos_ids
# when it is a special token of the vocabulary and the chat template writes it.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>",
                   "<|endoftext|>", "</s>")


class Tokenizer:
    def __init__(self, backend: Backend, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
                 chat_template=None, extra_eos_ids=(), clean_up_spaces=False, name="tokenizer"):
        self.backend = backend
        self.name = name  # where it came from, for error messages
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.bos_id = self._token_id(bos_token)
        self.eos_id = self._token_id(eos_token)
        self.unk_id = self._token_id(unk_token)
        self.pad_id = self._token_id(pad_token)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._compiled_template = None
        # transformers only cleans up decoded spaces for non-BPE models (the cleanup corrupts BPE output)
        self.clean_up_spaces = clean_up_spaces and type(backend.model).__name__ != "BPE"
        # does encode(text) start with BOS? (what the post-processor does; the scheduler may want to know)
        self.add_bos = self.bos_id is not None and backend.encode("").ids[:1] == [self.bos_id]

        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        stops = {self.eos_id} | {int(i) for i in extra_eos_ids}
        for token in TURN_END_TOKENS:
            if token in specials and chat_template and token in chat_template:
                stops.add(backend.token_to_id(token))
        self.eos_ids = {i for i in stops if i is not None}

    def _token_id(self, token):
        return None if token is None else self.backend.token_to_id(token)

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids})"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # special tokens written in the text (e.g. "<|im_start|>") become their ids, like transformers does
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=bool(skip_special_tokens))
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ValueError(f"{self.name} has no chat template")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        # like transformers: drop keys whose value is None; special tokens visible as variables; kwargs win
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        variables = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                       ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if v is not None}
        variables.update(tools=None, documents=None)
        variables.update(kwargs)
        try:
            return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None

    def encode_chat(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # the template writes BOS itself when the model wants one: never add another (transformers does the same)
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def clean_up_tokenization(text: str) -> str:
    # transformers' cleanup of spaces before punctuation and contractions (WordPiece-era decoders)
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# -------------------------------------------------------------------------------------------- chat templates

class _GenerationTag(jinja2.ext.Extension):
    # {% generation %}...{% endgeneration %} marks assistant text for training masks; for inference it is a no-op
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template the way transformers does (sandboxed, trim_blocks + lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"malformed chat template (line {e.lineno}): {e.message}") from None


# -------------------------------------------------------------------------------------------- streaming

class StreamDecoder:
    """Incremental detokenizer: put(id) returns the new printable text, flush() whatever is left at the end.

    Decoding token by token breaks both multi-byte characters (a byte token alone decodes to U+FFFD) and
    sentencepiece spacing (a lone "▁world" decodes to "world"). So we decode a short window of previous tokens with
    and without the new ones and emit the difference, holding back while the text ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = []
        self.prefix_offset = 0  # start of the context window (tokens already printed, kept for spacing)
        self.read_offset = 0  # tokens before this have been printed

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # incomplete character (or nothing visible yet): wait for more tokens
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        # text still held back at the end of generation (e.g. a truncated character: printed as U+FFFD, like decode)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


# -------------------------------------------------------------------------------------------- shared builders

def bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable bytes map to themselves, the others to chars from U+0100 on
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def merges_from_vocab(vocab: dict[str, int], scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary (sentencepiece stores none): every split of a token into two tokens.

    Ranked like transformers' generate_merges: by the merged token's id (ascending) or, with scores, by its score
    (descending), then by the left piece's length; ties keep vocabulary order.
    """
    keyed = scores if scores is not None else vocab
    found = []
    for token, key in keyed.items():
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found += [(key, len(left), len(right), left, right) for left, right in local]
    found.sort(key=lambda m: m[:3], reverse=scores is not None)
    return [(left, right) for _, _, _, left, right in found]


def _sentencepiece_bpe(vocab, merges, add_prefix_space=True, legacy=False) -> Backend:
    # what transformers' LlamaTokenizer builds: BPE with byte fallback over "▁"-escaped text, no normalizer
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # "first": only the start of the text gets the dummy "▁" prefix; legacy mode also prefixes each chunk after
    # a special token
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _set_bos_eos(backend: Backend, bos, eos, add_bos: bool, add_eos: bool):
    # the post-processor transformers installs for add_bos_token / add_eos_token
    add_bos = bool(add_bos) and bos is not None and backend.token_to_id(bos) is not None
    add_eos = bool(add_eos) and eos is not None and backend.token_to_id(eos) is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    special = ([(bos, backend.token_to_id(bos))] if add_bos else []) + \
              ([(eos, backend.token_to_id(eos))] if add_eos and eos != (bos if add_bos else None) else [])
    backend.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                           special_tokens=special)


def _add_named_specials(backend: Backend, tokens):
    # named special tokens (bos/eos/unk/pad) always match whole in text, even when the vocab has them as plain tokens
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens) if t and t not in added]
    if new:
        backend.add_special_tokens(new)


# -------------------------------------------------------------------------------------------- Hugging Face dirs

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_str(value):
    # tokenizer_config.json writes special tokens as "<s>" or as a serialized AddedToken {"content": "<s>", ...}
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template_from_dir(path: Path, config: dict):
    # newest transformers format first: chat_template.jinja, then chat_template.json, then tokenizer_config.json
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _ids_list(value):
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def _sentencepiece_backend(model_file: Path, config: dict) -> Backend:
    from sentencepiece import sentencepiece_model_pb2  # protobuf schema shipped with the sentencepiece library

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:
        raise ValueError(f"{model_file}: not a sentencepiece model ({e})") from None
    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 bpe, 3 word, 4 char
        raise NotImplementedError(f"{model_file}: only sentencepiece BPE models are supported "
                                  f"(model_type {proto.trainer_spec.model_type})")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = _sentencepiece_bpe(vocab, merges_from_vocab(vocab), add_prefix_space=config.get("add_prefix_space", True),
                                 legacy=config.get("legacy", False))
    # control pieces (3) are special tokens, user-defined ones (4) plain added tokens; both match whole in text
    backend.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                for p in proto.pieces if p.type == 3])
    backend.add_tokens([AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == 4])
    return backend


def _load_dir(path: Path) -> Tokenizer:
    config = _read_json(path / "tokenizer_config.json")
    if (path / "tokenizer.json").is_file():
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"{path / 'tokenizer.json'}: cannot load ({str(e).splitlines()[0]})") from None
        defaults = {}
        rebuilt = False
    elif (path / "tokenizer.model").is_file():
        backend = _sentencepiece_backend(path / "tokenizer.model", config)
        defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # LlamaTokenizer's
        rebuilt = True
    else:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")

    special = {k: _token_str(config.get(k, defaults.get(k))) for k in ("bos_token", "eos_token", "unk_token",
                                                                        "pad_token")}
    # added tokens listed in the config but missing from the backend
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    for token in (config.get("added_tokens_decoder") or {}).values():
        if token.get("content") and token["content"] not in known:
            backend.add_tokens([AddedToken(token["content"], single_word=token.get("single_word", False),
                                           lstrip=token.get("lstrip", False), rstrip=token.get("rstrip", False),
                                           normalized=token.get("normalized", False),
                                           special=token.get("special", False))])
    _add_named_specials(backend, special.values())
    # like transformers: an explicit add_bos_token/add_eos_token (or no post-processor at all) replaces the one in
    # tokenizer.json
    if rebuilt or "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
        _set_bos_eos(backend, special["bos_token"], special["eos_token"], config.get("add_bos_token", False),
                     config.get("add_eos_token", False))

    extra_eos = []
    for name in ("generation_config.json", "config.json"):
        extra_eos += _ids_list(_read_json(path / name).get("eos_token_id"))
    return Tokenizer(backend, **special, chat_template=_chat_template_from_dir(path, config),
                     extra_eos_ids=extra_eos, clean_up_spaces=config.get("clean_up_tokenization_spaces", False),
                     name=str(path))


# -------------------------------------------------------------------------------------------- GGUF

# Pre-tokenizer split regexes per 'tokenizer.ggml.pre' (the ones transformers knows; others fall back to GPT-2's).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_WORD_UPPER = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
_WORD_LOWER = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (f"{_WORD_UPPER}{_CONTRACTION}|{_WORD_LOWER}{_CONTRACTION}"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = f"{_WORD_UPPER}|{_WORD_LOWER}" + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GGUF_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


def _str(value):
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _gguf_byte_level(meta: dict, tokens: list[str]) -> Backend:
    to_unicode = bytes_to_unicode()
    alphabet = set(to_unicode.values())
    # tokens are stored in the byte alphabet ("Ġhello"); the rare one that is not gets respelled from its UTF-8
    vocab = {t if set(t) <= alphabet else "".join(to_unicode[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(_str(m).split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = merges_from_vocab(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"])))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    split = GGUF_PRE_SPLITS.get(_str(meta.get("tokenizer.ggml.pre", "default")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_sentencepiece(meta: dict, tokens: list[str]) -> Backend:
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(_str(m).split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = merges_from_vocab(vocab, dict(zip(tokens, (float(s) for s in meta["tokenizer.ggml.scores"]))))
    return _sentencepiece_bpe(vocab, merges)


def _load_gguf(meta: dict) -> Tokenizer:
    kind = _str(meta.get("tokenizer.ggml.model", ""))
    arch = _str(meta.get("general.architecture", ""))
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("GGUF metadata has no tokenizer (missing 'tokenizer.ggml.tokens')")
    tokens = [_str(t) for t in meta["tokenizer.ggml.tokens"]]
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", ())]
    if kind == "gpt2":
        backend = _gguf_byte_level(meta, tokens)
        alphabet = set(bytes_to_unicode().values())
        # a "control" token spelled outside the byte alphabet is a llama.cpp mislabel: transformers skips it
        control = [t for t, k in zip(tokens, types) if k == 3 and set(t) <= alphabet]
        defaults = ["<|endoftext|>"]  # GPT2Tokenizer's default unk/bos/eos
        add_bos_default = False
    elif kind == "llama" and not arch.startswith(("gemma", "phi3")):
        backend = _gguf_sentencepiece(meta, tokens)
        control = [t for t, k in zip(tokens, types) if k == 3]
        defaults = ["<unk>", "<s>", "</s>"]  # LlamaTokenizer's default unk/bos/eos
        add_bos_default = True  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
    else:
        raise NotImplementedError(f"GGUF tokenizer '{kind}' (architecture '{arch}') is not supported "
                                  f"(supported: 'gpt2' byte-level BPE, 'llama' sentencepiece BPE)")
    # transformers builds an intermediate GPT2Tokenizer/LlamaTokenizer whose default specials become special added
    # tokens; we follow it only for those in the vocabulary (it would append the missing ones as new ids)
    vocab = backend.get_vocab()
    _add_named_specials(backend, [t for t in defaults if t in vocab])
    # control tokens (3) -> special added tokens; user-defined (4) -> plain added tokens; both match whole in text
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = backend.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == 4 and t in vocab]
    if user:
        backend.add_tokens(user)

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    _add_named_specials(backend, special.values())
    _set_bos_eos(backend, special["bos_token"], special["eos_token"],
                 bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                 bool(meta.get("tokenizer.ggml.add_eos_token", False)))
    extra_eos = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(backend, **special, chat_template=_str(template) if template is not None else None,
                     extra_eos_ids=extra_eos, name=_str(meta.get("general.name", "gguf")))


def load_tokenizer(source) -> Tokenizer:
    """Tokenizer from a Hugging Face directory (path), from GGUF metadata (a dict of key -> value), or from the
    info dict weights.load_model returns ({"kind": "hf_dir", "path": ...} / {"kind": "gguf", "metadata": ...})."""
    if isinstance(source, dict) and "kind" in source:
        source = source["metadata"] if source["kind"] == "gguf" else source["path"]
    if isinstance(source, dict):
        return _load_gguf(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path}: expected a directory with tokenizer.json or tokenizer.model "
                         f"(for a GGUF file pass its metadata dict)")
    return _load_dir(path)
