"""Where the daemon listens: the default unix socket, stale sockets, and the TCP loopback rule."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from daemon.config import split_host_port
from daemon.errors import MoedError

SOCKET_NAME = "moed.sock"
SYSTEM_SOCKET = Path("/run/moed") / SOCKET_NAME


def default_socket(env: Mapping[str, str] | None = None) -> Path:
    """The socket `moed serve` uses: $RUNTIME_DIRECTORY (systemd), else $XDG_RUNTIME_DIR/moed, else /tmp."""
    env = os.environ if env is None else env
    if env.get("RUNTIME_DIRECTORY"):  # systemd's RuntimeDirectory=moed: /run/moed
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "moed" / SOCKET_NAME
    return Path(f"/tmp/moed-{os.getuid()}") / SOCKET_NAME


def client_sockets(env: Mapping[str, str] | None = None) -> list[Path]:
    """Sockets a client tries, in order: $MOED_SOCKET, the user's default, the system service's."""
    env = os.environ if env is None else env
    out = [Path(env["MOED_SOCKET"])] if env.get("MOED_SOCKET") else []
    for p in (default_socket(env), SYSTEM_SOCKET):
        if p not in out:
            out.append(p)
    return out


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the unix socket at path."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def prepare_socket(path: Path) -> None:
    """Create the socket's folder (0750 when new); remove a stale socket; refuse a live one."""
    if len(str(path)) > 100:
        raise MoedError("unix socket path is too long (at most 100 characters)", path)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o750)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise MoedError("exists and is not a socket", path)
        if socket_answers(path):
            raise MoedError("another daemon is already listening on this socket", path)
        path.unlink()


def check_tcp(address: str, allow_remote: bool, token: str | None) -> tuple[str, int]:
    """(host, port) for --tcp; non-loopback addresses need allow_remote and a token."""
    host, port = split_host_port(address)
    if not is_loopback(host):
        if not allow_remote:
            raise MoedError(f"refusing to listen on non-loopback address {address}: pass --allow-remote "
                            "(and a token) to accept connections from other machines")
        if not token:
            raise MoedError("--allow-remote needs a token (MOED_TOKEN, token or token_file in the config)")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether host is a loopback name or address (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except socket.gaierror as e:
            if e.errno in (errno.ENOENT, socket.EAI_NONAME):
                raise MoedError(f"cannot resolve tcp host {host!r}") from None
            raise MoedError(f"cannot resolve tcp host {host!r}: {e}") from None
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def grpc_tcp_target(host: str, port: int) -> str:
    """host:port as gRPC spells it ([v6]:port for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
