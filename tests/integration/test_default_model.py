"""The built-in default model (daemon/data/pydoc-moe): what it is, that it learned, that it loads everywhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from daemon.cli import default_model_path
from daemon.loaders.build import load_model

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "pydoc_heldout_sample.txt"


@pytest.fixture(scope="module")
def lm():
    return load_model(default_model_path())


def perplexity(model, ids: list[int]) -> float:
    x = torch.tensor(ids)
    with torch.inference_mode():
        logits = model.forward(x[None, :-1], model.new_cache(len(ids)))[0]
    return math.exp(F.cross_entropy(logits.float(), x[1:]).item())


def test_default_model_is_a_small_trained_moe():
    folder = default_model_path()
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size <= 30 * 2**20, size
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] >= 8 and cfg["num_experts_per_tok"] >= 2
    log = json.loads((folder / "training_log.json").read_text())
    assert log["seconds"] <= 60 * 60 and log["held_out_loss"] < log["held_out_loss_untrained"] - 3
    for name in ("README.md", "LICENSE-PSF.txt", "tokenizer.json", "model.safetensors"):
        assert (folder / name).is_file(), name
    # every routed expert of every layer was trained to be used (the load-balancing loss)
    assert all(v < 3.0 for v in log["log"][-1]["max_load_x_uniform"])


def test_held_out_text_is_predicted_far_better_than_by_the_untrained_model(lm, tmp_path):
    """Perplexity on a held-out passage (never trained on) vs the same architecture with random weights."""
    from daemon.tiny import iter_random_weights, save_sharded

    ids = lm.tokenizer.encode(SAMPLE.read_text(encoding="utf-8"))[:256]
    trained = perplexity(lm.model, ids)
    folder = default_model_path()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    save_sharded(iter_random_weights("qwen3_moe", json.loads((folder / "config.json").read_text()), seed=0), tmp_path)
    untrained = perplexity(load_model(tmp_path).model, ids)
    assert trained < 80 < 1000 < untrained, (trained, untrained)


def test_moed_and_transformers_agree_on_the_default_model(lm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    ids = torch.tensor([lm.tokenizer.encode(SAMPLE.read_text(encoding="utf-8"))[:64]])
    with torch.inference_mode():
        ours = lm.model.forward(ids, lm.model.new_cache(64))
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3


def test_default_model_writes_python_documentation_prose(lm):
    """Greedy text from a documentation-like prompt is mostly words the tokenizer knows whole."""
    from daemon.generate import Summary, generate
    from daemon.sampling import SamplingParams

    prompt = lm.tokenizer.encode("The list type")
    s = Summary(prompt)
    list(generate(lm, prompt, SamplingParams(max_tokens=32), s))
    words = s.text.split()
    assert len(words) >= 10
    common = {"the", "a", "of", "to", "is", "and", "in", "that", "be", "for", "it", "an", "are", "as", "or"}
    assert sum(w.lower().strip(".,:;()") in common for w in words) >= 3, s.text


def test_loading_leaves_torch_init_alone_and_imports_no_compiler():
    """The model is built on the meta device with torch.nn.init's fills skipped (meta tensors hold no values):
    filling them there went through torch's reference ops, which import torch._dynamo and sympy, ~40 MiB
    held for the process's life. In a fresh process: loading imports neither, and torch.nn.init is as it was."""
    import subprocess
    import sys

    code = ("import sys, torch, torch.nn.init as init\n"
            "before = init.normal_\n"
            "from daemon.cli import default_model_path\n"
            "from daemon.loaders.build import load_model\n"
            "lm = load_model(default_model_path())\n"
            "assert init.normal_ is before\n"
            "w = torch.nn.Linear(4, 4).weight\n"
            "assert w.abs().sum() > 0  # init works again after\n"
            "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
