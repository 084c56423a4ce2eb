"""Number formatting shared by the panels."""

from __future__ import annotations

NA = "n/a"


def size(n: float) -> str:
    """Bytes as a short human string (1.5 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return NA


def ms(seconds: float, count: int = 1) -> str:
    """Seconds as milliseconds, n/a without samples."""
    return f"{seconds * 1000:.1f} ms" if count else NA
