"""A GGUF vocabulary (llama.cpp's tokenizer.ggml.* metadata) as moed's Tokenizer: byte-level BPE and SentencePiece."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from daemon.errors import FormatError, UnsupportedError
from daemon.tokenizer import Tokenizer

Meta = Callable[[str, Any], Any]  # (key, default) -> metadata value, as GGUFCheckpoint.meta


@dataclass(frozen=True, slots=True)
class PreTokenizer:
    """llama.cpp's pre-tokenizer regexes for a `tokenizer.ggml.pre` name (applied in sequence)."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False  # llama.cpp's default when the file does not say


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = _QWEN2.replace(r"\p{N}|", r"\p{N}{1,3}|")
_DEEPSEEK_LLM = (  # llama-vocab.cpp, non-ASCII escaped: NFC-normalising tools must not alter the ranges
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-"
    "\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b"
    "\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8"
    "-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **{n: PreTokenizer((_QWEN2,)) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2")},
    **{n: PreTokenizer((_GPT2,)) for n in ("gpt-2", "olmo", "mpt", "phi-2", "jais")},
    **{n: PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True) for n in ("llama3", "llama-v3", "llama-bpe")},
    **{n: PreTokenizer((_LLAMA3,)) for n in ("dbrx", "smaug-bpe")},
    "deepseek-llm": PreTokenizer(_DEEPSEEK_LLM),
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
}
TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 2, 3, 4  # gguf.TokenType
# Control tokens llama.cpp treats as end-of-generation by their text.
EOG_TEXTS = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                       "<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>"})
SPACE = "\u2581"  # SentencePiece's visible space


@dataclass(frozen=True, slots=True)
class Built:
    """A tokenizer model built from a vocabulary, with what llama.cpp assumes where the file says nothing."""

    tok: HFTokenizer
    add_bos: bool
    bos: int | None = None
    eos: int | None = None
    unknown_special: bool = False  # tokens of type UNKNOWN (`<unk>`) are special, as in llama.cpp's SPM


def tokenizer_from_gguf(meta: Meta, path: Path) -> Tokenizer:
    """moed's Tokenizer for the vocabulary in a GGUF file's metadata (as llama.cpp tokenizes it)."""
    kind = meta("tokenizer.ggml.model", None)
    build = MODELS.get(kind)
    if build is None:
        raise UnsupportedError(f"tokenizer model {kind!r} (moed reads byte-level BPE, 'gpt2', and SentencePiece "
                               f"BPE, 'llama', from GGUF)", path)
    tokens: list[str] = meta("tokenizer.ggml.tokens", None) or []
    types: list[int] = meta("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise FormatError(f"tokenizer has {len(tokens)} tokens and {len(types)} token types", path)
    built = build(meta, path, tokens)
    tok = built.tok
    special_types = {TOKEN_CONTROL, TOKEN_UNKNOWN} if built.unknown_special else {TOKEN_CONTROL}
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, ty in enumerate(types) if ty in special_types])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, ty in enumerate(types) if ty == TOKEN_USER_DEFINED])

    def token_id(key: str, default: int | None = None) -> int | None:
        v = meta(key, None)
        v = default if v is None else int(v)
        return v if v is not None and 0 <= v < len(tokens) else None

    bos = token_id("tokenizer.ggml.bos_token_id", built.bos)
    eos = token_id("tokenizer.ggml.eos_token_id", built.eos)
    ends = [eos, token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")]
    ends += [i for i, ty in enumerate(types) if ty == TOKEN_CONTROL and tokens[i] in EOG_TEXTS]
    special = {k: tokens[i] for k, i in (("bos_token", bos), ("eos_token", eos)) if i is not None}
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", built.add_bos)) and bos is not None
    return Tokenizer(tok, bos, tuple(dict.fromkeys(e for e in ends if e is not None)), add_bos,
                     meta("tokenizer.chat_template", None), special)


def byte_level_bpe(meta: Meta, path: Path, tokens: list[str]) -> Built:
    """GPT-2 style BPE over bytes, with the merges the file lists and llama.cpp's pre-tokenizer regexes."""
    merges: list[str] = meta("tokenizer.ggml.merges", None) or []
    pre_name = meta("tokenizer.ggml.pre", "default")
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise UnsupportedError(f"pre-tokenizer {pre_name!r} (supported: {', '.join(PRE_TOKENIZERS)})", path)
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise FormatError(f"bad BPE merge {m!r}", path)
        pairs.append((m[:cut], m[cut + 1:]))
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges))
    except Exception as e:  # tokenizers raises its own exception types
        raise FormatError(f"cannot build the BPE tokenizer: {e}", path) from None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return Built(tok, pre.add_bos)


def sentencepiece_bpe(meta: Meta, path: Path, tokens: list[str]) -> Built:
    """llama.cpp's SPM tokenizer: ▁ for spaces, merges best-scored piece first, unknown characters as <0xXX> bytes."""
    scores = meta("tokenizer.ggml.scores", None)
    if scores is None:
        raise UnsupportedError("SentencePiece vocabulary without tokenizer.ggml.scores (moed needs them to order "
                               "the merges)", path)
    if len(scores) != len(tokens):
        raise FormatError(f"tokenizer has {len(tokens)} tokens and {len(scores)} scores", path)
    unk = int(meta("tokenizer.ggml.unknown_token_id", 0))  # llama.cpp's default for SPM
    unk_text = tokens[unk] if 0 <= unk < len(tokens) else None
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        tok = HFTokenizer(models.BPE(vocab, spm_merges(tokens, scores), unk_token=unk_text, byte_fallback=True))
    except Exception as e:  # tokenizers raises its own exception types
        raise FormatError(f"cannot build the SentencePiece tokenizer: {e}", path) from None
    prefix = bool(meta("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default for SPM
    # llama.cpp prepends the space to every run of text, at the start or after a special or user-defined token;
    # the normalizer runs once per such run (added tokens are split off first), so Prepend does the same.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE)] * prefix + [normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    return Built(tok, add_bos=True, bos=1, eos=2, unknown_special=True)


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges that replay llama.cpp's SPM merging: any two adjacent pieces spelling a token, best score first."""
    ids = {t: i for i, t in enumerate(tokens)}  # a repeated text means its last id, as in llama.cpp's map
    found = []
    for text, i in ids.items():
        for cut in range(1, len(text)):
            if text[:cut] in ids and text[cut:] in ids:
                found.append((-float(scores[i]), i, cut))
    # llama.cpp breaks ties between equal scores by position in the text; a BPE rank cannot, so equal scores go
    # in token-id order (SentencePiece lists pieces in the order it learned them).
    found.sort()
    return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in found]


MODELS: dict[str, Callable[[Meta, Path, list[str]], Built]] = {"gpt2": byte_level_bpe, "llama": sentencepiece_bpe}
