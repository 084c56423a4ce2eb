"""Daemon configuration: a TOML file, then MOED_* environment variables, then flags."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.errors import MoedError

if TYPE_CHECKING:
    from offload.tiered import OffloadOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DURATIONS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
FOREVER = ("forever", "never", "inf")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `moed serve` can be told; durations in seconds."""

    model: str | None = None  # model folder or GGUF file; None: the built-in default model
    socket: str | None = None  # unix socket path; None: the default location
    tcp: str | None = None  # HOST:PORT to listen on as well (loopback unless allow_remote)
    allow_remote: bool = False  # permit a non-loopback tcp address (needs a token)
    token: str | None = None  # secret TCP clients send as `authorization: Bearer <token>`
    token_file: str | None = None  # file holding the token (first line)
    max_batch: int = 8  # sequences in one decode step
    max_queue: int = 64  # requests waiting for a batch slot before RESOURCE_EXHAUSTED
    default_max_tokens: int = 512  # when a request does not say
    keep_alive: float = 300.0  # idle seconds before the weights are unloaded; < 0: never
    grace_period: float = 30.0  # seconds running streams get to finish on SIGTERM
    threads: int = 0  # torch CPU threads; 0: torch's default
    warmup: bool = True  # run a short generation after loading, before SERVING
    models_dir: str | None = None  # where ListModels looks; None: $MOED_HOME/models
    log_level: str = "info"
    bits: str | None = None  # routed experts' bit-width, 1-8 or "auto"; None: 8 (stores) / as stored
    ram_budget: str | None = None  # experts' RAM: bytes (512MiB, 2G), % of their 8-bit bytes, or N%free
    vram_budget: str | None = None  # experts' VRAM (GPU), same forms; None: no GPU expert tier
    policy: str = "moed"  # expert cache policy: lru, lfu, score (HybriMoE) or moed
    dense_bits: int | None = None  # 8 or 4: attention, shared/dense MLPs, lm_head at that many bits; None: as stored

    def offload(self) -> OffloadOptions | None:
        """Tiered-expert options when any of bits / ram_budget / vram_budget is set, else None."""
        from offload.tiered import OffloadOptions

        if self.bits is None and self.ram_budget is None and self.vram_budget is None:
            return None
        bits: int | str = 8 if self.bits is None else (self.bits if self.bits == "auto" else int(self.bits))
        return OffloadOptions(bits=bits, ram_budget=self.ram_budget, vram_budget=self.vram_budget,
                              policy=self.policy)

    def validate(self) -> None:
        """Raise MoedError naming the first bad value."""
        if self.max_batch < 1:
            raise MoedError(f"max_batch must be >= 1 (got {self.max_batch})")
        if self.max_queue < 0:
            raise MoedError(f"max_queue must be >= 0 (got {self.max_queue})")
        if self.default_max_tokens < 1:
            raise MoedError(f"default_max_tokens must be >= 1 (got {self.default_max_tokens})")
        if self.grace_period < 0:
            raise MoedError(f"grace_period must be >= 0 (got {self.grace_period})")
        if self.threads < 0:
            raise MoedError(f"threads must be >= 0 (got {self.threads})")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise MoedError(f"log_level must be debug, info, warning or error (got {self.log_level!r})")
        if self.tcp is not None:
            split_host_port(self.tcp)
        if self.bits is not None and self.bits != "auto" and not (self.bits.isdigit() and 1 <= int(self.bits) <= 8):
            raise MoedError(f"bits must be 1-8 or auto (got {self.bits!r})")
        if self.dense_bits not in (None, 4, 8):
            raise MoedError(f"dense_bits must be 4 or 8 (got {self.dense_bits})")
        opts = self.offload()
        try:
            if opts is not None:
                opts.validate()
            else:
                from offload.cache import make_cache_policy
                make_cache_policy(self.policy, 1)
        except ValueError as e:
            raise MoedError(str(e)) from None

    @property
    def secret(self) -> str | None:
        """The TCP token: `token`, else the first line of `token_file`."""
        if self.token:
            return self.token
        if self.token_file:
            try:
                text = Path(self.token_file).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise MoedError(f"cannot read token file: {e.strerror}", self.token_file) from None
            if not text:
                raise MoedError("token file is empty", self.token_file)
            return text.splitlines()[0].strip()
        return None


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
KINDS = {"model": str, "socket": str, "tcp": str, "allow_remote": bool, "token": str, "token_file": str,
         "max_batch": int, "max_queue": int, "default_max_tokens": int, "keep_alive": "duration",
         "grace_period": "duration", "threads": int, "warmup": bool, "models_dir": str, "log_level": str,
         "bits": "amount", "ram_budget": "amount", "vram_budget": "amount", "policy": str,
         "dense_bits": int}


def load_config(file: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                flags: Mapping[str, Any] | None = None) -> Config:
    """Config from `file` (or $MOED_CONFIG), overridden by MOED_<FIELD> variables, then by flags (None: unset)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = file or env.get("MOED_CONFIG")
    if path:
        values.update(_from_toml(Path(path)))
    for name in FIELDS:
        var = f"MOED_{name.upper()}"
        if var in env:
            values[name] = _convert(name, env[var], var, from_text=True)
    for name, value in (flags or {}).items():
        if name not in FIELDS:
            raise MoedError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = _convert(name, value, f"--{name.replace('_', '-')}", from_text=isinstance(value, str))
    cfg = Config(**values)
    cfg.validate()
    return cfg


def moed_home() -> Path:
    """moed's data directory: $MOED_HOME, else $XDG_DATA_HOME/moed, else ~/.local/share/moed."""
    if os.environ.get("MOED_HOME"):
        return Path(os.environ["MOED_HOME"])
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "moed"


def parse_duration(value: Any, where: str = "duration") -> float:
    """Seconds from 30, 2.5, "30s", "5m", "1h", "250ms"; -1 or "forever" give -1."""
    if isinstance(value, bool):
        raise MoedError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in FOREVER:
            return -1.0
        m = re.fullmatch(r"(-?\d+(?:\.\d*)?)\s*(ms|s|m|h|d)?", text)
        if not m:
            raise MoedError(f"{where}: expected a duration like 30s, 5m or 1h, got {value!r}")
        seconds = float(m.group(1)) * DURATIONS[m.group(2) or "s"]
    else:
        raise MoedError(f"{where}: expected a duration, got {value!r}")
    if math.isnan(seconds):
        raise MoedError(f"{where}: expected a duration, got {value!r}")
    return -1.0 if seconds < 0 else seconds


def split_host_port(address: str) -> tuple[str, int]:
    """("::1", 50051) from "[::1]:50051", ("127.0.0.1", 0) from "127.0.0.1:0"."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", address.strip())
    if not m:
        raise MoedError(f"tcp address must be HOST:PORT or [IPv6]:PORT (got {address!r})")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise MoedError(f"tcp port must be <= 65535 (got {port})")
    return host, port


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoedError("config file not found", path) from None
    except OSError as e:
        raise MoedError(f"cannot read config file: {e.strerror}", path) from None
    except tomllib.TOMLDecodeError as e:
        raise MoedError(f"not valid TOML: {e}", path) from None
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise MoedError(f"unknown setting {key!r} (known: {', '.join(FIELDS)})", path)
        out[name] = _convert(name, value, f"{path}: {key}", from_text=False)
    return out


def _convert(name: str, value: Any, where: str, from_text: bool) -> Any:
    kind = KINDS[name]
    if kind == "duration":
        return parse_duration(value, where)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and str(value).strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise MoedError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(str(value).strip())
            except ValueError:
                pass
        raise MoedError(f"{where}: expected an integer, got {value!r}")
    if kind == "amount" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # bits = 4, ram_budget = 1073741824 in TOML
    if not isinstance(value, str):
        raise MoedError(f"{where}: expected a string, got {value!r}")
    return value or None
