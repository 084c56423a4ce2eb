"""The committed Python modules of moed.proto are what protoc generates from it today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_modules_are_current(tmp_path):
    fresh = load_tool().generate(tmp_path)
    names = sorted(p.name for p in fresh)
    assert names == ["moed_pb2.py", "moed_pb2.pyi", "moed_pb2_grpc.py"]
    for f in fresh:
        committed = ROOT / "proto" / "moed" / "v1" / f.name
        assert committed.read_bytes() == f.read_bytes(), (
            f"{committed} differs from what moed.proto generates: run `python tools/gen_proto.py`")


def test_imports_as_proto_moed_v1():
    from proto.moed.v1 import moed_pb2, moed_pb2_grpc
    assert moed_pb2.DESCRIPTOR.package == "moed.v1"
    assert hasattr(moed_pb2_grpc, "MoedStub") and hasattr(moed_pb2_grpc, "MoedServicer")
