"""deploy/: the systemd unit has what the daemon relies on, and the example config loads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def unit() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in (DEPLOY / "moed.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def test_unit_is_a_notify_service_with_watchdog_and_directories():
    u = unit()
    assert u["Type"] == ["notify"] and u["NotifyAccess"] == ["main"] and u["Restart"] == ["on-failure"]
    assert float(u["WatchdogSec"][0]) > 0 and u["User"] == ["moed"]
    assert u["RuntimeDirectory"] == u["StateDirectory"] == u["ConfigurationDirectory"] == ["moed"]
    assert "serve --config /etc/moed/moed.toml" in u["ExecStart"][0]
    assert u["KillSignal"] == ["SIGTERM"]


def test_hardening_keeps_gpus_reachable():
    u = unit()
    assert u["ProtectSystem"] == ["strict"] and u["NoNewPrivileges"] == ["yes"]
    assert "PrivateDevices" not in u  # it would hide /dev/nvidia*
    allowed = " ".join(u["DeviceAllow"])
    assert "char-nvidia-frontend" in allowed and "/dev/nvidia-uvm" in allowed and "/dev/nvidiactl" in allowed


def test_example_config_loads_and_drains_within_the_stop_timeout():
    cfg = load_config(DEPLOY / "moed.toml", env={})
    assert cfg.grace_period < float(unit()["TimeoutStopSec"][0])
    assert cfg.keep_alive == 1800 and cfg.max_batch >= 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    text = (DEPLOY / "moed.service").read_text()
    exe = shutil.which("true")
    (tmp_path / "moed.service").write_text(text.replace("/opt/moed/.venv/bin/moed", exe))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "moed.service")], capture_output=True, text=True)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "moed.service" in line]
    assert not problems, problems
