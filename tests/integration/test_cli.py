"""The `moed` command as a user runs it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MOED = [sys.executable, "-m", "daemon.cli"]


def moed(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([*MOED, *args], capture_output=True, text=True, timeout=300, env=e)


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("moed: error: ")
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture()
def model_copy(tiny_model, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe"), dst)
    return dst


def test_generate_json(tiny_model):
    r = moed("generate", "--model", str(tiny_model("qwen3_moe")), "--prompt", "The expert said",
             "--max-tokens", "8", "--json", "--temperature", "0.7", "--top-k", "50", "--top-p", "0.9",
             "--seed", "7")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) + (out["finish_reason"] == "stop") >= 1
    assert out["prompt_tokens"] and all(isinstance(t, int) for t in out["tokens"])
    assert out["timings"]["prefill_s"] > 0
    again = json.loads(moed("generate", "--model", str(tiny_model("qwen3_moe")), "--prompt", "The expert said",
                            "--max-tokens", "8", "--json", "--temperature", "0.7", "--top-k", "50",
                            "--top-p", "0.9", "--seed", "7").stdout)
    assert again["tokens"] == out["tokens"]  # seeded sampling is reproducible


def test_make_tiny_model_cli(tmp_path):
    out = tmp_path / "m"
    r = moed("make-tiny-model", "--arch", "olmoe", "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "olmoe" and cfg["num_experts"] == 8
    assert (out / "model.safetensors").stat().st_size > 1_000_000


def test_missing_path(tmp_path):
    r = moed("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert_user_error(r, "nope", "no such file")


def test_unknown_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "jamba"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert_user_error(moed("generate", "--model", str(model_copy), "--prompt", "x"),
                      "unknown architecture 'jamba'", str(model_copy))


def test_truncated_safetensors(model_copy):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_user_error(moed("generate", "--model", str(model_copy), "--prompt", "x"), "model.safetensors")


def test_shapes_disagree_with_config(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["hidden_size"] = 128
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert_user_error(moed("generate", "--model", str(model_copy), "--prompt", "x"),
                      "has shape", "config implies")


def test_expert_shapes_disagree_with_config(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["moe_intermediate_size"] = 128
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert_user_error(moed("generate", "--model", str(model_copy), "--prompt", "x"), "expert", "config implies")


def test_bad_sampling_argument(tiny_model):
    assert_user_error(moed("generate", "--model", str(tiny_model("qwen3_moe")), "--prompt", "x",
                           "--top-p", "1.5"), "top_p")


def test_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    assert_user_error(moed("generate", "--model", str(f), "--prompt", "x"), "not a model")


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    r = moed("make-tiny-model", "--arch", "qwen3_moe", "--out", str(out), "--format", "gguf")
    assert r.returncode == 0, r.stderr
    return out


def test_generate_from_gguf(gguf_model):
    r = moed("generate", "--model", str(gguf_model), "--prompt", "The expert", "--max-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["tokens"]) >= 1


def test_truncated_gguf(gguf_model, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_model.read_bytes()[: gguf_model.stat().st_size // 2])
    assert_user_error(moed("generate", "--model", str(bad), "--prompt", "x"), str(bad), "runs past the end")


def test_unsupported_gguf_tensor_type(gguf_model, tmp_path, patch_gguf_tensor):
    bad = tmp_path / "q2k.gguf"
    shutil.copyfile(gguf_model, bad)
    patch_gguf_tensor(bad, "blk.0.attn_q.weight", 4, 10)  # GGML type 10 = Q2_K
    assert_user_error(moed("generate", "--model", str(bad), "--prompt", "x"), str(bad), "Q2_K", "blk.0.attn_q.weight")
