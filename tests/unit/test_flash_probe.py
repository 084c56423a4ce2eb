"""The flash probe reads from the disk, not from the page cache, every time."""

from __future__ import annotations

import os
import statistics
import sys

import pytest

from profiler.flash import FlashProbe, cached_read_seconds, probe_flash, resident_fraction, write_probe_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache checks need Linux")

MIB = 1 << 20


def _cache_whole_file(path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass


@pytest.fixture()
def probe_file(tmp_path):
    path = write_probe_file(tmp_path / "flash-probe.bin", 32 * MIB)
    if resident_fraction(path) is None:
        pytest.skip("mincore is not available here")
    return path


def test_every_read_starts_cold_even_if_the_file_was_cached(probe_file):
    _cache_whole_file(probe_file)
    assert resident_fraction(probe_file) == 1.0  # the page cache holds all of it
    probe = FlashProbe(probe_file)
    reads = probe.run([4096, 65536, MIB, 4 * MIB], repeats=3)
    assert all(r.cold is True for r in reads), reads
    for r in reads[:4]:  # read the same ranges again: still cold
        again = probe.read(r.size, r.offset)
        assert again.cold is True
    if probe.method == "direct":  # O_DIRECT reads leave nothing in the page cache
        assert resident_fraction(probe_file, reads[-1].offset, reads[-1].size) == 0.0


def test_a_file_read_twice_reports_flash_speed_both_times(probe_file):
    """Both probe passes over the same range are slower than a read served from the page cache."""
    size = 8 * MIB
    probe = FlashProbe(probe_file)
    first = [probe.read(size, 0).seconds for _ in range(3)]
    second = [probe.read(size, 0).seconds for _ in range(3)]
    cached = [cached_read_seconds(probe_file, size) for _ in range(5)]
    assert resident_fraction(probe_file, 0, size) == 1.0  # the cached reads really were cached
    t_cached = statistics.median(cached)
    # RAM copies run at several GB/s; reads that go to the device are measurably slower.
    assert statistics.median(first) > 1.5 * t_cached, (first, cached)
    assert statistics.median(second) > 1.5 * t_cached, (second, cached)


def test_probe_flash_reports_its_method_and_verification(tmp_path):
    samples, info = probe_flash(tmp_path, [4096, MIB], repeats=2, file_bytes=8 * MIB)
    assert len(samples) == 4 and {s.op for s in samples} == {"flash:read"}
    assert info["method"] in ("direct", "fadvise") and info["cold_verified"] is True
    assert os.path.getsize(info["file"]) == 8 * MIB
    again, _ = probe_flash(tmp_path, [4096], repeats=1, file_bytes=8 * MIB)  # reuses the file
    assert len(again) == 1


def test_reads_must_be_aligned(probe_file):
    with pytest.raises(ValueError):
        FlashProbe(probe_file).read(1000, 0)
