"""Snapshots of the expert tiers and the links between them, for Status and Watch. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TierView:
    """One place experts live, its budget and use; hits are expert uses served from it."""

    name: str
    device: str
    budget: int
    used: int
    experts_resident: int
    experts_total: int
    hits: int = 0
    misses: int = 0
    experts_by_bits: dict[int, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Share of expert uses served from this tier."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass(frozen=True, slots=True)
class LinkView:
    """Traffic between two tiers."""

    source: str
    target: str
    bytes_moved: int = 0
    transfers: int = 0
    busy_seconds: float = 0.0  # time at least one transfer was under way (side-by-side transfers count once)
