"""GGUF files (llama.cpp): metadata as an HF-style config, tensors under Hugging Face names, the vocabulary."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from daemon.errors import FormatError, MoedError, UnsupportedError
from daemon.loaders.checkpoint import Checkpoint
from daemon.loaders.gguf_vocab import tokenizer_from_gguf
from daemon.models.moe import ExpertWeights
from daemon.tokenizer import Tokenizer

T = GGMLQuantizationType
DEQUANTISABLE = frozenset({T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K})
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True, slots=True)
class ArchSpec:
    """How one architecture is named in llama.cpp and on the Hugging Face hub."""

    gguf_arch: str  # general.architecture
    model_type: str  # config.json model_type
    experts_key: str  # config key for the number of routed experts
    moe: str = "mlp"  # HF module holding the router and experts
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str = "shared_expert"  # HF module of the shared expert(s)
    permute_qk: bool = False  # convert_hf_to_gguf permutes q/k rows for llama's interleaved rope
    norm_topk: bool | None = None  # llama.cpp's fixed top-k renormalisation; None: `expert_weights_norm`


ARCHS: dict[str, ArchSpec] = {s.gguf_arch: s for s in (
    ArchSpec("qwen3moe", "qwen3_moe", "num_experts", norm_topk=True),
    ArchSpec("qwen2moe", "qwen2_moe", "num_experts", norm_topk=False),
    ArchSpec("llama", "mixtral", "num_local_experts", moe="block_sparse_moe", expert_names=("w1", "w3", "w2"),
             permute_qk=True, norm_topk=True),
    ArchSpec("olmoe", "olmoe", "num_experts", norm_topk=False),
    ArchSpec("deepseek2", "deepseek_v2", "n_routed_experts", shared="shared_experts"),
)}
BY_MODEL_TYPE: dict[str, ArchSpec] = {s.model_type: s for s in ARCHS.values()}

TOP_NAMES = (("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"),
             ("output.weight", "lm_head.weight"))
EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def layer_names(spec: ArchSpec) -> tuple[tuple[str, str], ...]:
    """(llama.cpp, HF) suffixes of every per-layer tensor, after `blk.N.` and `model.layers.N.`."""
    attn = [("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight"),
            ("attn_q_norm.weight", "self_attn.q_norm.weight"), ("attn_k_norm.weight", "self_attn.k_norm.weight"),
            ("attn_q_a.weight", "self_attn.q_a_proj.weight"),
            ("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
            ("attn_q_b.weight", "self_attn.q_b_proj.weight"),
            ("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
            ("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
            ("attn_kv_b.weight", "self_attn.kv_b_proj.weight")]
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("output", "o_proj")):
        attn += [(f"attn_{ours}.{p}", f"self_attn.{theirs}.{p}") for p in ("weight", "bias")]
    mlp = [("ffn_gate_inp.weight", f"{spec.moe}.gate.weight"),
           ("exp_probs_b.bias", f"{spec.moe}.gate.e_score_correction_bias"),
           ("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight")]
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        mlp += [(f"ffn_{ours}.weight", f"mlp.{theirs}.weight"),
                (f"ffn_{ours}_shexp.weight", f"mlp.{spec.shared}.{theirs}.weight")]
    return tuple(attn + mlp)


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every tensor's type, shape and extent against the file before mapping it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__(path, "r")

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        """Refuse an array longer than the rest of the file could hold (the base reader would loop over it)."""
        if raw_type == GGUFValueType.ARRAY:
            itype, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            if len(itype) and len(count):
                scalar = {int(k): v for k, v in self.gguf_scalar_to_np.items()}.get(int(itype[0]))
                least = np.dtype(scalar).itemsize if scalar is not None else 8  # strings: an 8-byte length
                if int(count[0]) * least > len(self.data) - orig_offs:
                    raise FormatError(f"metadata array at byte {orig_offs} claims {int(count[0])} items, more than "
                                      f"the file holds (truncated or corrupt)", self._path)
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            shape = [int(d) for d in dims]
            if len(shape) > MAX_DIMS:
                raise FormatError(f"tensor {name} has {len(shape)} dimensions (at most {MAX_DIMS})", self._path)
            try:
                qtype = T(int(raw_type[0]))
            except ValueError:
                raise FormatError(f"tensor {name} has unknown type id {int(raw_type[0])}", self._path) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            if shape and shape[0] % block:
                raise FormatError(f"tensor {name} ({qtype.name}) has rows of {shape[0]}, "
                                  f"not a multiple of its block size {block}", self._path)
            start = start_offs + int(offset[0])
            end = start + math.prod(shape) // block * type_size
            if int(offset[0]) % self.alignment:
                raise FormatError(f"tensor {name} starts at offset {int(offset[0])}, not aligned to "
                                  f"{self.alignment} bytes", self._path)
            if end > size:
                raise FormatError(f"tensor {name} ({qtype.name}, shape {tuple(reversed(shape))}) runs past the end "
                                  f"of the file: needs bytes up to {end}, file has {size} (truncated?)", self._path)
        super()._build_tensors(start_offs, fields)


def read_gguf(path: Path) -> GGUFReader:
    """Open and validate a GGUF file; anything malformed is a FormatError naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise FormatError(f"truncated GGUF file: {size} bytes, shorter than the 24-byte header", path)
    if head[:4] != b"GGUF":
        raise FormatError(f"not a GGUF file (magic {head[:4]!r}, expected b'GGUF')", path)
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise FormatError(f"unsupported GGUF version {version} (moed reads versions 2 and 3)", path)
    n_tensors, n_kv = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
    if n_tensors * 28 + n_kv * 13 > size:  # smallest possible tensor info / key-value entry
        raise FormatError(f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than "
                          f"a {size}-byte file can hold (truncated or corrupt)", path)
    try:
        return _CheckedReader(path)
    except MoedError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise FormatError(f"corrupt or truncated GGUF header: {e}", path) from None


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file, read through a memory map; tensors are dequantised to float32 on request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader = read_gguf(self.path)
        self._fields = self._reader.fields
        self._meta: dict[str, Any] = {}
        self._tensors = {t.name: t for t in self._reader.tensors}
        arch = self.meta("general.architecture")
        if not isinstance(arch, str):
            raise FormatError("no general.architecture in the metadata", self.path)
        self.spec = ARCHS.get(arch)
        if self.spec is None:
            raise UnsupportedError(f"GGUF architecture {arch!r} is not supported "
                                   f"(supported: {', '.join(ARCHS)})", self.path)
        self._hf = self._hf_names()
        self.config = self._config()

    def meta(self, key: str, default: Any = None) -> Any:
        """A metadata value (strings, numbers, lists), or `default` if the file does not have it."""
        if key not in self._meta:
            field = self._fields.get(key)
            if field is None:
                return default
            try:
                value = field.contents()
                if field.types == [GGUFValueType.FLOAT32]:  # 1e-06, not 9.999999974752427e-07
                    value = float(str(np.float32(value)))
                self._meta[key] = value
            except (UnicodeDecodeError, IndexError, ValueError) as e:
                raise FormatError(f"metadata {key} is unreadable: {e}", self.path) from None
        return self._meta[key]

    def _arch(self, key: str, default: Any = None) -> Any:
        value = self.meta(f"{self.spec.gguf_arch}.{key}", default)
        if isinstance(value, list):  # per-layer values (head counts): moed needs them uniform
            if len(set(value)) != 1:
                raise UnsupportedError(f"{self.spec.gguf_arch}.{key} varies by layer ({value})", self.path)
            value = value[0]
        return value

    def _hf_names(self) -> dict[str, str]:
        table = dict(layer_names(self.spec))
        out = {hf: name for name, hf in TOP_NAMES if name in self._tensors}
        for name in self._tensors:
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
            if m and m.group(2) in table:
                out[f"model.layers.{m.group(1)}.{table[m.group(2)]}"] = name
            elif m and m.group(2) == "attn_k_b.weight":  # newer converters split kv_b for MLA
                out[f"model.layers.{m.group(1)}.self_attn.kv_b_proj.weight"] = name
        return out

    def _config(self) -> dict[str, Any]:
        s, a = self.spec, self._arch
        for key in ("embedding_length", "block_count", "attention.head_count", "expert_count", "expert_used_count"):
            if a(key) is None:
                raise FormatError(f"metadata {s.gguf_arch}.{key} is missing", self.path)
        if not a("expert_count"):
            raise UnsupportedError(f"{s.gguf_arch} model without experts: moed serves MoE models only", self.path)
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise FormatError("tensor token_embd.weight is missing", self.path)
        hidden, heads, layers = int(a("embedding_length")), int(a("attention.head_count")), int(a("block_count"))
        inter = a("feed_forward_length")
        cfg: dict[str, Any] = {
            "model_type": s.model_type, "architectures": [], "torch_dtype": "float32", "hidden_act": "silu",
            "vocab_size": int(embd.shape[1]), "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": int(a("attention.head_count_kv", heads)),
            "head_dim": int(a("attention.key_length", hidden // heads)),
            "intermediate_size": None if inter is None else int(inter),
            "moe_intermediate_size": int(a("expert_feed_forward_length", inter or 0)),
            s.experts_key: int(a("expert_count")), "num_experts_per_tok": int(a("expert_used_count")),
            "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(a("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(a("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "rope_scaling": self._rope_scaling(),
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta("tokenizer.ggml.eos_token_id"),
        }
        dense = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in self._tensors]
        if s.gguf_arch != "llama":  # Mixtral's config has no such field: it always renormalises
            cfg["norm_topk_prob"] = bool(a("expert_weights_norm", False)) if s.norm_topk is None else s.norm_topk
        if s.gguf_arch in ("qwen3moe", "qwen2moe"):
            cfg.update(mlp_only_layers=dense, decoder_sparse_step=1)
        if s.gguf_arch == "qwen2moe":
            shexp = next((t for n, t in self._tensors.items() if n.endswith(".ffn_gate_shexp.weight")), None)
            cfg["shared_expert_intermediate_size"] = int(a("expert_shared_feed_forward_length",
                                                           0 if shexp is None else shexp.shape[1]))
            cfg["qkv_bias"] = cfg["attention_bias"]
            cfg["attention_bias"] = "blk.0.attn_output.bias" in self._tensors
        if s.gguf_arch == "olmoe":
            cfg.update(clip_qkv=a("attention.clamp_kqv"))
        if s.gguf_arch == "llama":
            cfg.update(sliding_window=None)
        if s.gguf_arch == "deepseek2":
            cfg.update(self._deepseek2_config(cfg, dense))
        return cfg

    def _rope_scaling(self) -> dict | None:
        kind = self._arch("rope.scaling.type")
        if kind in (None, "none"):
            return None
        rs: dict[str, Any] = {"type": kind, "factor": float(self._arch("rope.scaling.factor", 1.0))}
        orig = self._arch("rope.scaling.original_context_length")
        if orig is not None:
            rs["original_max_position_embeddings"] = int(orig)
        if kind == "yarn":
            rs.update(beta_fast=float(self._arch("rope.scaling.yarn_beta_fast", 32.0)),
                      beta_slow=float(self._arch("rope.scaling.yarn_beta_slow", 1.0)))
            log_mul = self._arch("rope.scaling.yarn_log_multiplier")
            if log_mul:  # llama.cpp stores 0.1 * mscale_all_dim
                rs.update(mscale=float(log_mul) * 10, mscale_all_dim=float(log_mul) * 10)
        return rs

    def _deepseek2_config(self, cfg: dict[str, Any], dense: list[int]) -> dict[str, Any]:
        a = self._arch
        q_lora = a("attention.q_lora_rank")
        rope_dim = int(a("rope.dimension_count"))
        key_len = int(a("attention.key_length_mla", a("attention.key_length")))
        value_len = int(a("attention.value_length_mla", a("attention.value_length")))
        gating = a("expert_gating_func", 1)
        if gating != 1:
            raise UnsupportedError(f"deepseek2 expert gating function {gating} (moed: softmax only)", self.path)
        return {
            "q_lora_rank": int(q_lora) if q_lora else None, "kv_lora_rank": int(a("attention.kv_lora_rank")),
            "qk_rope_head_dim": rope_dim, "qk_nope_head_dim": key_len - rope_dim, "v_head_dim": value_len,
            "head_dim": None, "n_shared_experts": int(a("expert_shared_count", 0)),
            "first_k_dense_replace": int(a("leading_dense_block_count", len(dense))), "moe_layer_freq": 1,
            "routed_scaling_factor": float(a("expert_weights_scale", 1.0)),
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "scoring_func": "softmax",
            "num_key_value_heads": cfg["num_attention_heads"],
        }

    # -- tensors --

    def tensor(self, name: str) -> torch.Tensor | None:
        gname = self._hf.get(name)
        if gname is None:
            return None
        if gname.endswith("attn_k_b.weight"):
            return self._kv_b(gname)
        x = self._load(gname)
        if self.spec.permute_qk and gname.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            heads = self.config["num_attention_heads"] if ".attn_q." in gname else self.config["num_key_value_heads"]
            x = unpermute_qk(x, heads)
        if gname.endswith("ffn_gate_inp_shexp.weight") and x.dim() == 1:
            x = x[None, :]  # HF: Linear(hidden, 1)
        return x

    def _kv_b(self, k_b_name: str) -> torch.Tensor:
        """DeepSeek's kv_b_proj [H*(nope+v), kv_lora] from llama.cpp's split k_b [H, kv_lora, nope] and v_b."""
        k_b = self._load(k_b_name)  # [H, kv_lora, nope]
        v_b = self._load(k_b_name.replace("attn_k_b", "attn_v_b"))  # [H, v, kv_lora]
        kv = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [H, nope+v, kv_lora]
        return kv.reshape(-1, kv.shape[-1]).contiguous()

    def _load(self, gname: str) -> torch.Tensor:
        t = self._tensors.get(gname)
        if t is None:
            raise FormatError(f"tensor {gname} is missing", self.path)
        if t.tensor_type not in DEQUANTISABLE:
            raise UnsupportedError(f"tensor {gname} has type {t.tensor_type.name}, which moed cannot read "
                                   f"(supported: {', '.join(q.name for q in sorted(DEQUANTISABLE))})", self.path)
        try:
            x = dequantize(t.data, t.tensor_type)
        except (ValueError, OSError) as e:
            raise FormatError(f"cannot read tensor {gname} ({t.tensor_type.name}): {e}", self.path) from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return torch.from_numpy(np.array(x, dtype=np.float32, copy=True).reshape(shape))

    def experts(self, layer: int, prefix: str, names: tuple[str, str, str], n_experts: int) -> ExpertWeights | None:
        stacked = [f"blk.{layer}.{n}" for n in EXPERT_TENSORS]
        if all(n in self._tensors for n in stacked):
            return ExpertWeights(*(self._load(n) for n in stacked))  # gate/up [E, I, D], down [E, D, I]
        per_expert = [[f"blk.{layer}.ffn_{p}.{e}.weight" for e in range(n_experts)] for p in ("gate", "up", "down")]
        if all(n in self._tensors for part in per_expert for n in part):  # early GGUF (one tensor per expert)
            return ExpertWeights(*(torch.stack([self._load(n) for n in part]) for part in per_expert))
        return None

    # -- tokenizer --

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_gguf(self.meta, self.path)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's llama q/k row permutation (half-split rope -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's llama q/k row permutation, as it writes q_proj/k_proj to GGUF."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()
