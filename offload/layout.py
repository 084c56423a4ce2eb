"""Where an expert's bytes lie in the experts file: a head section, then one section per bit-plane.

Section 0 holds the heads (scales, minimums) of gate, up and down; section 1 + i holds their plane i
(with any per-plane params). Every section is padded to the alignment, so the r-bit prefix of an
expert (sections 0..r) is one contiguous, aligned byte range, and so is any run of planes.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.planes import PLANES
from quant.schemes import Scheme

ALIGN = 4096
MATRICES = ("gate", "up", "down")


def align_up(n: int, a: int = ALIGN) -> int:
    """n rounded up to a multiple of a."""
    return -(-n // a) * a


def section_name(s: int) -> str:
    """'head' for section 0, 'plane i' for section 1 + i."""
    return "head" if s == 0 else f"plane {s - 1}"


@dataclass(frozen=True, slots=True)
class ExpertLayout:
    """Byte layout of one expert extent; parts[s][m] = bytes of matrix m in section s (before padding)."""

    shapes: tuple[tuple[int, int], ...]
    parts: tuple[tuple[int, ...], ...]
    align: int = ALIGN

    @classmethod
    def build(cls, scheme: Scheme, shapes: tuple[tuple[int, int], ...], group: int, align: int = ALIGN) -> "ExpertLayout":
        """The layout a scheme gives an expert of these matrix shapes."""
        parts = [tuple(scheme.head_nbytes(s, group) for s in shapes)]
        parts += [tuple(scheme.plane_nbytes(i, s, group) for s in shapes) for i in range(PLANES)]
        return cls(tuple(shapes), tuple(parts), align)

    @property
    def sections(self) -> int:
        """Number of sections (head + planes)."""
        return len(self.parts)

    def section_length(self, s: int) -> int:
        """Padded length of section s."""
        return align_up(sum(self.parts[s]), self.align)

    def section_offset(self, s: int) -> int:
        """Offset of section s from the start of the extent."""
        return sum(self.section_length(i) for i in range(s))

    def prefix(self, bits: int) -> int:
        """Bytes of the r-bit prefix: the head and planes 0..bits-1."""
        if not 0 <= bits <= PLANES:
            raise ValueError(f"bits must be in 0..{PLANES}, got {bits}")
        return self.section_offset(bits + 1)

    @property
    def length(self) -> int:
        """Length of the whole extent (all 8 planes)."""
        return self.section_offset(self.sections)

    def split(self, s: int, buf) -> list[memoryview]:
        """Section s's buffer cut into its per-matrix parts (padding dropped)."""
        mv = memoryview(buf)
        out, at = [], 0
        for n in self.parts[s]:
            out.append(mv[at:at + n])
            at += n
        return out
