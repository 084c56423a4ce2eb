"""SentencePiece ('llama') GGUF vocabularies: moed's tokenizer against llama.cpp's on vocabularies trained here."""

from __future__ import annotations

import ctypes
import heapq
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFWriter, TokenType
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers

from daemon.errors import FormatError, UnsupportedError
from daemon.generate import Summary, TextStream, generate
from daemon.gguf_export import export_gguf
from daemon.loaders.build import load_model
from daemon.loaders.gguf import GGUFCheckpoint
from daemon.sampling import SamplingParams
from daemon.tiny import corpus_text, make_tiny_model

SPACE = "\u2581"
N_VOCAB = 1024  # the tiny Mixtral's embedding rows; the vocabulary is padded to it, as convert_hf_to_gguf does
BOS, EOS = 1, 2
# Mistral's template: it writes BOS itself.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] "
                 "+ ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
TEXTS = [
    "The router is a single linear map followed by a softmax; its highest scores name the experts.",
    "   three leading spaces, two trailing  ",
    "multiple    inner   spaces",
    "lines\nand\n\nblank lines\r\n\ttabs\tinside\n",
    "digits 0123456789, 3.14159 and 1,000,000",
    "punctuation!?;:,.()[]{}<>@#$%^&*_~`|\\/\"'",
    "naïve café ✓ — Wörter, Ünïcödé",
    "emoji 🙂🚀 and CJK 专家混合模型",
    "<s>starts with BOS text</s> then </s> and <s> inside",
    "[INST] Which experts ran? [/INST] The first two.</s>",
    "a</s>b",
    "x<unk>y",
    f"{SPACE}already{SPACE}escaped",
    "",
    " ",
    "\n",
]
VARIANTS = {  # id: (pieces trained per word or per line, score order, add_space_prefix in the file)
    "words": ("words", "merges", None),
    "words-no-prefix": ("words", "merges", False),
    "words-shuffled": ("words", "shuffled", None),
    "lines": ("lines", "merges", None),
    "lines-shuffled": ("lines", "shuffled", True),
}


@dataclass(frozen=True, slots=True)
class SpmVocab:
    """A SentencePiece-style GGUF vocabulary."""

    tokens: list[str]
    scores: list[float]
    types: list[int]


def train_pieces(split: str, size: int = 700) -> tuple[list[str], list[str]]:
    """Characters and merged pieces (in merge order) of a BPE trained on the repo's corpus, with spaces as ▁."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    if split == "words":  # pieces like "▁word", as SentencePiece's default whitespace split gives
        tok.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme="never", split=True)
    # No tabs or newlines in the alphabet: they must fall back to <0x09>, <0x0A> as in Llama's vocabulary.
    lines = [line.replace("\t", "    ") for line in corpus_text().splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=size, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    return sorted(t for t in model["vocab"] if len(t) == 1), list(dict.fromkeys(a + b for a, b in merges))


def spm_vocab(split: str, order: str, seed: int = 0) -> SpmVocab:
    """<unk> <s> </s>, the 256 <0xXX> byte tokens, merged pieces scored in merge order (or shuffled), characters,
    two control tokens, then unused padding: the layout of Llama's and Mistral's vocabularies."""
    chars, merged = train_pieces(split)
    scores = [-float(i) for i in range(len(merged))]
    if order == "shuffled":  # scores that are no merge order at all: llama.cpp still merges best score first
        random.Random(seed).shuffle(scores)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *merged, *chars, "[INST]", "[/INST]"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, *[TokenType.BYTE] * 256,
             *[TokenType.NORMAL] * (len(merged) + len(chars)), TokenType.CONTROL, TokenType.CONTROL]
    scores = [0.0] * 259 + scores + [-float(len(merged) + i) for i in range(len(chars))] + [0.0, 0.0]
    assert len(tokens) <= N_VOCAB
    pad = range(len(tokens), N_VOCAB)
    return SpmVocab(tokens + [f"[PAD{i}]" for i in pad], scores + [0.0] * len(pad),
                    [int(t) for t in types] + [int(TokenType.UNUSED)] * len(pad))


def with_vocab(src: Path, dst: Path, vocab: SpmVocab | None, add_space_prefix: bool | None = None,
               model: str = "llama") -> Path:
    """A copy of a GGUF file whose tokenizer metadata is replaced by `vocab` (as convert_hf_to_gguf writes SPM)."""
    reader = GGUFReader(src)
    w = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith(("GGUF.", "tokenizer.")):
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre("default")
    if vocab is not None:
        w.add_token_list(vocab.tokens)
        if vocab.scores:
            w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.types)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_chat_template(CHAT_TEMPLATE)
    for t in reader.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in reader.tensors:
        w.write_tensor_data(t.data)
    w.close()
    return dst


def spm_reference(text: str, vocab: SpmVocab) -> list[int]:
    """llama.cpp's llm_tokenizer_spm_session::tokenize on already-escaped text, transcribed line by line."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    sym, queue = list(text), []
    prev, nxt = list(range(-1, len(sym) - 1)), [*range(1, len(sym)), -1]

    def try_add_bigram(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and sym[left] + sym[right] in ids:  # best score first, then leftmost
            heapq.heappush(queue, (-vocab.scores[ids[sym[left] + sym[right]]], left, right,
                                   len(sym[left] + sym[right])))

    for i in range(1, len(sym)):
        try_add_bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
            continue
        sym[left], sym[right] = sym[left] + sym[right], ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        try_add_bigram(prev[left], left)
        try_add_bigram(left, nxt[left])
    out, i = [], 0 if sym else -1
    while i != -1:
        out += [ids[sym[i]]] if sym[i] in ids else [ids[f"<0x{b:02X}>"] for b in sym[i].encode()]
        i = nxt[i]
    return out


def random_texts(vocab: SpmVocab, n: int, seed: int) -> list[str]:
    """Slices of the corpus, and strings glued from random pieces and characters that stress the merge order."""
    rng, corpus = random.Random(seed), corpus_text()
    pieces = [t.replace(SPACE, " ") for t, ty in zip(vocab.tokens, vocab.types) if ty == TokenType.NORMAL]
    odd = list(" \n\t.,é✓🙂专家")
    out = []
    for _ in range(n):
        start = rng.randrange(len(corpus))
        out.append(corpus[start:start + rng.randrange(1, 200)])
        out.append("".join(rng.choice(pieces) if rng.random() < 0.85 else rng.choice(odd)
                           for _ in range(rng.randrange(1, 30))))
    return out


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> Path:
    """A tiny Mixtral (GGUF architecture 'llama') with N_VOCAB embedding rows, exported as F32 GGUF."""
    root = tmp_path_factory.mktemp("spm")
    return export_gguf(make_tiny_model("mixtral", root / "mixtral", config={"vocab_size": N_VOCAB}),
                       root / "base.gguf", "F32")


@pytest.fixture(scope="module")
def spm(base_gguf, tmp_path_factory):
    """spm(variant) -> (vocabulary, path of the tiny Mixtral GGUF carrying it), cached."""
    root = tmp_path_factory.mktemp("spm-variants")
    made: dict[str, tuple[SpmVocab, Path]] = {}

    def get(variant: str) -> tuple[SpmVocab, Path]:
        if variant not in made:
            split, order, prefix = VARIANTS[variant]
            vocab = spm_vocab(split, order)
            made[variant] = vocab, with_vocab(base_gguf, root / f"{variant}.gguf", vocab, prefix)
        return made[variant]

    return get


def has_special(text: str) -> bool:
    return any(s in text for s in ("<s>", "</s>", "<unk>", "[INST]", "[/INST]"))


# --- without llama.cpp ---

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_matches_llama_cpp_algorithm(variant, spm):
    """moed's BPE gives the ids of a transcription of llama.cpp's SPM merge loop (BOS, ▁ prefix, byte fallback)."""
    vocab, path = spm(variant)
    tok = GGUFCheckpoint(path).tokenizer()
    prefix = SPACE if VARIANTS[variant][2] is not False else ""
    for text in [t for t in TEXTS if not has_special(t)] + random_texts(vocab, 300, seed=1):
        want = [BOS] + (spm_reference(prefix + text.replace(" ", SPACE), vocab) if text else [])
        assert tok.encode(text) == want, repr(text)


@pytest.mark.parametrize("variant", ["words", "words-no-prefix", "lines-shuffled"])
def test_round_trip_and_special_tokens(variant, spm):
    vocab, path = spm(variant)
    tok = GGUFCheckpoint(path).tokenizer()
    assert tok.vocab_size == N_VOCAB
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (BOS, (EOS,), True)
    assert tok.special == {"bos_token": "<s>", "eos_token": "</s>"}
    for text in [t for t in TEXTS if not has_special(t) and SPACE not in t] + random_texts(vocab, 100, seed=2):
        assert tok.decode(tok.encode(text)) == text, repr(text)  # (a literal ▁ comes back as a space)
    ids = tok.encode("专")  # not in the vocabulary: UTF-8 bytes E4 B8 93
    assert [vocab.tokens[i] for i in ids[-3:]] == ["<0xE4>", "<0xB8>", "<0x93>"]
    assert tok.encode("\t\n")[-2:] == [vocab.tokens.index("<0x09>"), vocab.tokens.index("<0x0A>")]
    inst, close = vocab.tokens.index("[INST]"), vocab.tokens.index("[/INST]")
    ids = tok.encode("[INST] hi [/INST]</s><unk>")
    assert ids[:2] == [BOS, inst] and ids[-3:] == [close, EOS, 0]
    assert tok.decode(ids) == " hi "  # "▁▁hi▁" after [INST]: the space prefix, then the text's own spaces
    assert tok.decode([BOS, inst, EOS, 0]) == "" and tok.decode([inst], skip_special=False) == "[INST]"
    assert tok.encode("<s>hi") == tok.encode("hi")  # the text's own <s> is the BOS: no second one


def test_chat_template_writes_the_only_bos(spm):
    _, path = spm("words")
    tok = GGUFCheckpoint(path).tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Which experts ran?"},
                                      {"role": "assistant", "content": "Two."},
                                      {"role": "user", "content": "Why?"}])
    assert prompt == "<s>[INST] Which experts ran? [/INST]Two.</s>[INST] Why? [/INST]"
    ids = tok.encode(prompt)
    assert ids.count(BOS) == 1 and ids[0] == BOS


@pytest.mark.parametrize("variant", ["words", "lines-shuffled"])
def test_text_stream_holds_back_partial_utf8(variant, spm):
    """Byte-fallback tokens stream as whole characters: no U+FFFD, and the pieces add up to the decoded text."""
    _, path = spm(variant)
    tok = GGUFCheckpoint(path).tokenizer()
    text = "emoji 🙂🚀, CJK 专家混合 and café ✓ end"
    ids = tok.encode(text, add_special=False)
    stream = TextStream(tok, ())
    pieces = [stream.push(i)[0] for i in ids]
    assert "" in pieces  # some tokens were partial characters and held back
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text


def test_load_model_and_generate(spm):
    """A Mixtral GGUF with a SentencePiece vocabulary loads and generates; the streamed text is the decoded ids."""
    _, path = spm("words")
    lm = load_model(path)
    ids = lm.tokenizer.encode("The router picks a few experts")
    assert ids[0] == BOS and lm.args.vocab_size == N_VOCAB
    summary = Summary(ids)
    steps = list(generate(lm, ids, SamplingParams(max_tokens=16, ignore_eos=True), summary))
    assert len(steps) == 16 and summary.tokens == [s.token for s in steps]
    assert summary.text.startswith("".join(s.text for s in steps))
    # Random weights emit stray byte tokens. ByteFallback turns a whole run of them into U+FFFD when the run is not
    # valid UTF-8, so a byte shown alone ("4") can become U+FFFD once an invalid byte follows: the stream keeps what
    # it showed. Everywhere else the streamed text is the decoded text.
    decoded = lm.tokenizer.decode(summary.tokens)
    assert len(summary.text) == len(decoded)
    assert all(a == b for a, b in zip(summary.text, decoded) if "\ufffd" not in (a, b))


def test_bad_sentencepiece_files(spm, base_gguf, tmp_path):
    vocab, _ = spm("words")
    no_scores = with_vocab(base_gguf, tmp_path / "no-scores.gguf", SpmVocab(vocab.tokens, [], vocab.types))
    with pytest.raises(UnsupportedError, match="scores") as e:
        GGUFCheckpoint(no_scores).tokenizer()
    assert str(no_scores) in str(e.value)
    short = with_vocab(base_gguf, tmp_path / "short.gguf", SpmVocab(vocab.tokens, vocab.scores[:-1], vocab.types))
    with pytest.raises(FormatError, match="1024 tokens and 1023 scores"):
        GGUFCheckpoint(short).tokenizer()
    bert = with_vocab(base_gguf, tmp_path / "bert.gguf", vocab, model="bert")
    with pytest.raises(UnsupportedError, match="'bert'.*'llama'"):
        GGUFCheckpoint(bert).tokenizer()


# --- against llama.cpp ---

def open_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_detokenize(llm, ids: list[int], remove_special: bool, unparse_special: bool) -> str:
    """llama.cpp's own llama_detokenize (llama-cpp-python's detokenize is a per-token loop of its own)."""
    from llama_cpp import llama_cpp as C
    buf = ctypes.create_string_buffer(16384)
    n = C.llama_detokenize(llm._model.vocab, (C.llama_token * len(ids))(*ids), len(ids), buf, len(buf),
                           remove_special, unparse_special)
    assert 0 <= n <= len(buf)
    return buf.raw[:n].decode("utf-8")


@pytest.mark.llama
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokenisation_matches_llama_cpp(variant, spm):
    vocab, path = spm(variant)
    tok = GGUFCheckpoint(path).tokenizer()
    llm = open_vocab(path)
    try:
        for text in TEXTS + random_texts(vocab, 300, seed=3):
            want = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            if text.startswith("<s>"):  # llama.cpp adds a second BOS here; moed's Tokenizer.encode does not
                assert want[:2] == [BOS, BOS]
                want = want[1:]
            assert tok.encode(text) == want, repr(text)
    finally:
        llm.close()


@pytest.mark.llama
@pytest.mark.parametrize("variant", ["words", "words-no-prefix", "lines-shuffled"])
def test_detokenisation_matches_llama_cpp(variant, spm):
    vocab, path = spm(variant)
    tok = GGUFCheckpoint(path).tokenizer()
    prefix = VARIANTS[variant][2] is not False
    specials = {i for i, ty in enumerate(vocab.types) if ty in (TokenType.CONTROL, TokenType.UNKNOWN)}
    llm = open_vocab(path)
    try:
        for text in TEXTS + random_texts(vocab, 100, seed=4):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            # Special tokens shown, each piece as it is (only the very first may lose its ▁).
            assert tok.decode(ids, skip_special=False) == llama_detokenize(llm, ids, False, True), repr(text)
            # Generated text (no BOS): llama.cpp drops the prefix space of the first token, as moed's decoder does.
            if ids[1:] and ids[1] not in specials:
                assert tok.decode(ids[1:]) == llama_detokenize(llm, ids[1:], True, False), repr(text)
            if prefix:  # llama-cpp-python strips one space after BOS whatever add_space_prefix says
                assert tok.decode(ids) == llm.detokenize(ids).decode("utf-8"), repr(text)
    finally:
        llm.close()


@pytest.mark.llama
def test_chat_prompt_matches_llama_cpp(spm):
    """A templated prompt (which writes its own <s>) tokenises as llama.cpp does without adding another BOS."""
    _, path = spm("words")
    tok = GGUFCheckpoint(path).tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "naïve café ✓ 🙂 — which experts ran?"}])
    llm = open_vocab(path)
    try:
        assert tok.encode(prompt) == llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    finally:
        llm.close()
