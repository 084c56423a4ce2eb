"""`moed serve` as a real process: the default model and socket, sd_notify, SIGTERM drain, the CLI client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.moed.v1 import moed_pb2 as pb
from proto.moed.v1 import moed_pb2_grpc as pb_grpc

MOED = [sys.executable, "-m", "daemon.cli"]
pytestmark = pytest.mark.slow


class FakeSystemd:
    """A NOTIFY_SOCKET that records every datagram the daemon sends."""

    def __init__(self, folder: Path) -> None:
        self.path = str(folder / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                pass

    def lines(self) -> list[str]:
        return [line for m in list(self.messages) for line in m]

    def wait_for(self, line: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while line not in self.lines():
            assert time.monotonic() < end, f"never received {line}; got {self.lines()}"
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture()
def home():
    """Runtime dir (for the default socket) and an empty MOED_HOME (the default model ships in the package)."""
    root = Path(tempfile.mkdtemp(prefix="moed-p-", dir="/tmp"))
    (root / "home").mkdir()
    (root / "run").mkdir(mode=0o700)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def env_for(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "MOED_SOCKET")}
    return {**env, "XDG_RUNTIME_DIR": str(root / "run"), "MOED_HOME": str(root / "home"), **extra}


def serve(root: Path, *args: str, **env: str) -> subprocess.Popen:
    log = open(root / "serve.log", "w")
    return subprocess.Popen([*MOED, "serve", *args], env=env_for(root, **env), stdout=log, stderr=subprocess.STDOUT)


def moed(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MOED, *args], env=env_for(root), capture_output=True, text=True, timeout=300)


def wait_serving(target: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the daemon exited during start-up"
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise AssertionError("the daemon never became SERVING")


def test_readme_main_command_notify_and_sigterm_drain(home):
    systemd = FakeSystemd(home)
    proc = serve(home, "--grace-period", "60s", NOTIFY_SOCKET=systemd.path, WATCHDOG_USEC="600000")
    sock = home / "run" / "moed" / "moed.sock"
    target = f"unix:{sock}"
    try:
        systemd.wait_for("READY=1")
        wait_serving(target, proc)
        lines = systemd.lines()
        ready = lines.index("READY=1")
        assert any(x.startswith("EXTEND_TIMEOUT_USEC=") for x in lines[:ready]), lines  # during the load
        assert any(x.startswith("STATUS=loading") for x in lines[:ready]), lines
        assert lines[ready + 1].startswith("STATUS=serving pydoc-moe on unix:")
        systemd.wait_for("WATCHDOG=1", timeout=5)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660

        # a second terminal: the default socket is found without being named
        r = moed(home, "generate", "--prompt", "The expert said", "--max-tokens", "8", "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["daemon"] == target and len(out["tokens"]) + (out["finish_reason"] == "stop") >= 1
        inproc = json.loads(moed(home, "generate", "--prompt", "The expert said", "--max-tokens", "8", "--json",
                                 "--in-process").stdout)
        assert "daemon" not in inproc and inproc["tokens"] == out["tokens"]
        assert inproc["prompt_tokens"] == out["prompt_tokens"]
        r = moed(home, "status")
        assert r.returncode == 0 and "model: pydoc-moe (qwen3_moe" in r.stdout and "serving" in r.stdout

        # SIGTERM while a stream runs: NOT_SERVING, new calls UNAVAILABLE, the stream finishes, exit 0
        stub = pb_grpc.MoedStub(grpc.insecure_channel(target))
        stream = stub.Generate(pb.GenerateRequest(text="a long answer", max_tokens=1500, ignore_eos=True))
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        systemd.wait_for("STOPPING=1", timeout=10)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(text="too late", max_tokens=2)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
        rest = list(stream)
        assert rest[-1].summary.finish_reason == pb.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 1500
        assert proc.wait(60) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        systemd.close()
    log = (home / "serve.log").read_text()
    assert "request finished" in log and "Traceback" not in log


def test_sigterm_after_the_grace_period_cancels_with_a_final_message(home):
    sock = home / "s.sock"
    proc = serve(home, "--socket", str(sock), "--grace-period", "0.5s", "--tcp", "127.0.0.1:0")
    try:
        wait_serving(f"unix:{sock}", proc)
        stub = pb_grpc.MoedStub(grpc.insecure_channel(f"unix:{sock}"))
        stream = stub.Generate(pb.GenerateRequest(text="never ends", max_tokens=2000, ignore_eos=True))
        next(stream)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        last = list(stream)[-1]
        assert last.summary.finish_reason == pb.FINISH_REASON_SHUTDOWN and last.summary.generated_tokens < 2000
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_sigterm_cancels_at_once(home):
    sock = home / "s.sock"
    proc = serve(home, "--socket", str(sock), "--grace-period", "10m")
    try:
        wait_serving(f"unix:{sock}", proc)
        stub = pb_grpc.MoedStub(grpc.insecure_channel(f"unix:{sock}"))
        stream = stub.Generate(pb.GenerateRequest(text="never ends", max_tokens=2000, ignore_eos=True))
        next(stream)
        proc.send_signal(signal.SIGTERM)
        # the second signal once the first has been taken (two SIGTERMs before the daemon's handler has run can
        # be one: the kernel keeps one pending, Python calls a handler once for both)
        end = time.monotonic() + 30
        while "stopping: draining" not in (home / "serve.log").read_text() and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.2)
        assert proc.poll() is None  # draining: the stream may go on for ten minutes
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert list(stream)[-1].summary.finish_reason == pb.FINISH_REASON_SHUTDOWN
        assert proc.wait(30) == 0 and time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "second signal" in (home / "serve.log").read_text()


def test_non_loopback_tcp_without_allow_remote_is_refused_at_start(home):
    r = subprocess.run([*MOED, "serve", "--socket", str(home / "x.sock"), "--tcp", "0.0.0.0:0"],
                       env=env_for(home), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("moed: error: refusing to listen on non-loopback")
    r = subprocess.run([*MOED, "serve", "--socket", str(home / "x.sock"), "--tcp", "0.0.0.0:0", "--allow-remote"],
                       env=env_for(home), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a token" in r.stderr


def test_generate_with_a_socket_nobody_serves_is_a_one_line_error(home):
    r = moed(home, "generate", "--socket", str(home / "nobody.sock"), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.startswith("moed: error: cannot reach moed at unix:")
    assert len(r.stderr.strip().splitlines()) == 1
    r = moed(home, "status")
    assert r.returncode == 2 and "no daemon answers" in r.stderr
