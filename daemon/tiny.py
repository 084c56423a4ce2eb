"""Tiny random-weight models of real MoE architectures, with a real small BPE tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from daemon.errors import MoedError
from daemon.loaders.build import hf_names
from daemon.models import SUPPORTED, architecture

# The published configs these tiny models scale down (fields as in their config.json).
REAL_CONFIGS: dict[str, dict] = {
    "qwen3_moe": {  # Qwen/Qwen3-30B-A3B
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "max_position_embeddings": 40960, "attention_bias": False, "hidden_act": "silu",
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
    "qwen2_moe": {  # Qwen/Qwen1.5-MoE-A2.7B
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": 32768, "bos_token_id": 151643,
        "eos_token_id": 151643, "torch_dtype": "bfloat16",
    },
    "mixtral": {  # mistralai/Mixtral-8x7B-v0.1
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "sliding_window": None, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    },
    "olmoe": {  # allenai/OLMoE-1B-7B-0924
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 50304,
        "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "norm_topk_prob": False, "clip_qkv": None, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "attention_bias": False,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": None,
        "eos_token_id": 50279, "pad_token_id": 1, "torch_dtype": "float32",
    },
    "deepseek_v2": {  # deepseek-ai/DeepSeek-V2-Lite
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
        "scoring_func": "softmax", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "max_position_embeddings": 163840, "attention_bias": False, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001,
        "torch_dtype": "bfloat16",
    },
}

# Scaled-down sizes. Rows of 256 keep every matrix quantisable to GGUF K-quants.
TINY = {
    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256,
    "shared_expert_intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 4096,
}
TINY_PER_ARCH: dict[str, dict] = {
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 8, "num_experts_per_tok": 2},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 8, "num_experts_per_tok": 2, "num_key_value_heads": 4},
    "deepseek_v2": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
                    "num_hidden_layers": 3, "num_key_value_heads": 4, "kv_lora_rank": 64,
                    "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 64,
                    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer split (llama.cpp calls it "qwen2").
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus_text() -> str:
    """The English text kept in the repo that tiny tokenizers are trained on."""
    return resources.files("daemon.data").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(vocab_size: int = 512, texts: Iterable[str] | None = None) -> Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on `texts` (default: the repo's corpus)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_text().splitlines(keepends=True) if texts is None else texts, trainer)
    return tok


def tiny_config(arch: str, vocab_size: int, eos_id: int) -> dict:
    """The real config of `arch` with its sizes scaled down."""
    cfg = dict(REAL_CONFIGS[arch])
    cfg.update({k: v for k, v in TINY.items() if k in cfg or k in ("head_dim", "max_position_embeddings")})
    cfg.update(TINY_PER_ARCH[arch])
    cfg.update({"vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": eos_id, "torch_dtype": "float32"})
    if "pad_token_id" in cfg:
        cfg["pad_token_id"] = eos_id
    if arch == "deepseek_v2":
        cfg.pop("head_dim", None)
    return cfg


def iter_random_weights(arch: str, cfg: dict, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Random tensors under the checkpoint names the real model uses (experts one by one)."""
    mod = architecture(arch)
    args = mod.Args.from_config(cfg)
    with torch.device("meta"):
        model = mod.Model(args)
    g = torch.Generator().manual_seed(seed)
    renames = getattr(mod, "RENAMES", ())

    def rand(shape: tuple[int, ...], name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):  # norms near 1
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        if name.endswith(".bias"):
            return 0.1 * torch.randn(shape, generator=g)
        fan_in = shape[-1] if len(shape) > 1 else 1
        std = 1.0 if "embed_tokens" in name else fan_in ** -0.5
        return std * torch.randn(shape, generator=g)

    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        hf = hf_names(name, renames)[-1]
        yield hf, rand(tuple(p.shape), hf)
    gate, up, down = mod.EXPERT_NAMES
    d, i = args.hidden_size, args.moe_intermediate_size
    for layer in model.moe_layers:
        prefix = hf_names(f"model.layers.{layer}.mlp.experts", renames)[-1]
        for e in range(args.num_experts):
            for n, shape in ((gate, (i, d)), (up, (i, d)), (down, (d, i))):
                key = f"{prefix}.{e}.{n}.weight"
                yield key, rand(shape, key)


def save_sharded(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path,
                 shard_bytes: int = 1 << 30) -> list[Path]:
    """Write tensors to model-NNNNN.safetensors files of about shard_bytes each, streaming."""
    files: list[Path] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            f = folder / f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(f), metadata={"format": "pt"})
            files.append(f)
            shard, size = {}, 0

    for name, t in tensors:
        shard[name] = t.contiguous()
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    if len(files) == 1:  # one shard: the name transformers gives it
        files[0] = files[0].rename(folder / "model.safetensors")
    return files


def make_tiny_model(arch: str, out: str | os.PathLike, seed: int = 0, config: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write a random model folder (config, safetensors, tokenizer); tiny unless `config` says otherwise.

    `config` entries override the tiny config (e.g. a real model's sizes for benchmarks);
    a vocab_size larger than the tokenizer's leaves the extra ids unused, as real models do.
    """
    if arch not in SUPPORTED:
        raise MoedError(f"unknown architecture {arch!r} (supported: {', '.join(SUPPORTED)})")
    out = Path(out)
    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    eos, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    cfg = tiny_config(arch, vocab, eos)
    cfg.update(config or {})
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [im_end, eos], "bos_token_id": None, "do_sample": False}, indent=2))
        save_sharded(((k, v.to(dtype)) for k, v in iter_random_weights(arch, cfg, seed)), tmp)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None,
            "add_bos_token": False, "model_max_length": cfg["max_position_embeddings"],
        }, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
