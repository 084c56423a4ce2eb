"""sd_notify by hand: datagrams on a fake NOTIFY_SOCKET, the watchdog interval, timeout extension."""

from __future__ import annotations

import os
import socket
import time

import pytest

from daemon.systemd import Notifier, Watchdog, extending_timeout, watchdog_interval


@pytest.fixture()
def manager(tmp_path):
    """A fake service manager: (address, receive(timeout)) on a datagram socket."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)

    def receive(timeout: float = 2.0) -> list[str] | None:
        sock.settimeout(timeout)
        try:
            return sock.recv(4096).decode().split("\n")
        except TimeoutError:
            return None

    yield path, receive
    sock.close()


def test_messages(manager):
    path, receive = manager
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready("serving tiny")
    assert receive() == ["READY=1", "STATUS=serving tiny", f"MAINPID={os.getpid()}"]
    n.status("two\nlines")
    assert receive() == ["STATUS=two lines"]
    n.extend_timeout(2.5)
    assert receive() == ["EXTEND_TIMEOUT_USEC=2500000"]
    n.watchdog()
    assert receive() == ["WATCHDOG=1"]
    n.stopping("draining 2 requests")
    assert receive() == ["STOPPING=1", "STATUS=draining 2 requests"]
    n.close()


def test_abstract_socket_address():
    name = f"moed-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert Notifier(f"@{name}").status("hi")
        assert sock.recv(100) == b"STATUS=hi"
    finally:
        sock.close()


def test_without_a_manager_nothing_is_sent_and_nothing_fails(tmp_path):
    assert not Notifier.from_env({}).ready("x")
    assert not Notifier(str(tmp_path / "gone")).ready("x")  # logged once, never raised


def test_watchdog_interval_applies_to_this_process_only():
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None and watchdog_interval({"WATCHDOG_USEC": "x"}) is None


def test_watchdog_pings_at_half_the_interval_while_healthy(manager):
    path, receive = manager
    healthy = [True]
    w = Watchdog(Notifier(path), 0.2, lambda: healthy[0]).start()
    t0 = time.monotonic()
    assert receive() == ["WATCHDOG=1"]
    assert receive() == ["WATCHDOG=1"]
    assert 0.15 <= time.monotonic() - t0 < 1.0
    healthy[0] = False
    while receive(0.15) is not None:  # a ping already on its way
        pass
    assert receive(0.3) is None  # a stalled engine gets no pings: systemd will restart it
    w.stop()


def test_extending_timeout_during_a_long_load(manager):
    path, receive = manager
    with extending_timeout(Notifier(path), "loading big", period=0.05):
        time.sleep(0.12)
    msgs = [receive() for _ in range(2)]
    assert all(m[0] == "EXTEND_TIMEOUT_USEC=150000" and m[1].startswith("STATUS=loading big (") for m in msgs)
