"""systemd integration by hand: sd_notify datagrams over $NOTIFY_SOCKET, the watchdog, timeout extension."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

log = logging.getLogger("moed.systemd")


class Notifier:
    """Sends sd_notify messages (READY=1, STATUS=..., ...) to the service manager; a no-op without one."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Notifier":
        """A notifier for $NOTIFY_SOCKET (set by systemd for Type=notify services)."""
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send KEY=VALUE lines as one datagram; False (logged once) if it could not be sent."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, target)
            return True
        except OSError as e:
            if not self._warned:
                log.warning("cannot notify the service manager at %s: %s", self.address, e)
                self._warned = True
            return False

    def ready(self, status: str) -> bool:
        """The daemon serves."""
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        """A one-line state shown by `systemctl status`."""
        return self.send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the start (or stop) timeout fires."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> bool:
        """Keep-alive ping for WatchdogSec."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        """The daemon is shutting down."""
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        """Close the datagram socket."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """WatchdogSec in seconds when it applies to this process, else None."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None


class Watchdog:
    """Pings WATCHDOG=1 every half interval while `healthy()` holds; stops on stop()."""

    def __init__(self, notifier: Notifier, interval: float, healthy: Callable[[], bool]) -> None:
        self.notifier, self.interval, self.healthy = notifier, interval, healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moed-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        """Start pinging."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop pinging."""
        self._stop.set()
        self._thread.join(self.interval)

    def _run(self) -> None:
        while not self._stop.wait(self.interval / 2):
            if self.healthy():
                self.notifier.watchdog()
            else:
                log.error("engine stalled; withholding the watchdog ping")


@contextmanager
def extending_timeout(notifier: Notifier, what: str, period: float = 5.0) -> Iterator[None]:
    """While the body runs (a long load), send STATUS and EXTEND_TIMEOUT_USEC every `period` seconds."""
    done = threading.Event()
    t0 = time.monotonic()

    def tick() -> None:
        while True:
            notifier.send(f"EXTEND_TIMEOUT_USEC={int(3 * period * 1e6)}",
                          f"STATUS={what} ({time.monotonic() - t0:.0f} s)")
            if done.wait(period):
                return

    thread = threading.Thread(target=tick, name="moed-extend-timeout", daemon=True)
    if notifier.enabled:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread.is_alive():
            thread.join(period)
