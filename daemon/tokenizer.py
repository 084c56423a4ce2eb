"""Tokenizer: a `tokenizers` BPE plus special ids and the chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from daemon.errors import FormatError, MoedError


@dataclass(slots=True)
class Tokenizer:
    """Encodes text to ids and back; knows BOS/EOS and the chat template."""

    tok: HFTokenizer
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    add_bos: bool = False
    chat_template: str | None = None
    special: dict[str, str] = field(default_factory=dict)  # bos_token/eos_token strings

    @classmethod
    def from_hf_folder(cls, path: Path, config: dict | None = None) -> "Tokenizer":
        """Load tokenizer.json and tokenizer_config.json (and chat_template.jinja) from a folder."""
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise MoedError("no tokenizer.json in the model folder", path)
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise FormatError(f"cannot read tokenizer: {e}", tj) from None
        tc: dict = {}
        if (path / "tokenizer_config.json").exists():
            try:
                tc = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise FormatError(f"not valid JSON: {e}", path / "tokenizer_config.json") from None
        template = tc.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        special = {k: _token_str(tc.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        special = {k: v for k, v in special.items() if v}
        gen = {}
        if (path / "generation_config.json").exists():
            gen = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
        eos: list[int] = []
        for src in (gen.get("eos_token_id"), (config or {}).get("eos_token_id")):
            eos += src if isinstance(src, list) else [] if src is None else [src]
        if "eos_token" in special and tok.token_to_id(special["eos_token"]) is not None:
            eos.append(tok.token_to_id(special["eos_token"]))
        bos = tok.token_to_id(special["bos_token"]) if "bos_token" in special else None
        if bos is None:
            bos = (config or {}).get("bos_token_id")
        return cls(tok, bos, tuple(dict.fromkeys(int(e) for e in eos)), bool(tc.get("add_bos_token", False)),
                   template, special)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of text; BOS first when the model wants it."""
        ids = self.tok.encode(text, add_special_tokens=add_special).ids
        if add_special and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of ids."""
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's template (sandboxed Jinja)."""
        if not self.chat_template:
            raise MoedError("this model has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.special.get("bos_token", ""), eos_token=self.special.get("eos_token", ""))
        except TemplateError as e:
            raise MoedError(f"chat template failed: {e}") from None


def _token_str(v: object) -> str | None:
    if isinstance(v, dict):  # AddedToken serialised form
        return v.get("content")
    return v if isinstance(v, str) else None
