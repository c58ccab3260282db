"""The slide cache's crop copy: exact, and without the spool's pages in memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.pipeline.slide_cache import save_npy_chunked


def test_crops_copy_exactly_from_a_memmap_with_an_offset_and_from_an_array(
    tmp_path: Path,
) -> None:
    crops = np.random.default_rng(0).integers(0, 256, (600, 8, 8, 3), np.uint8)
    spool = tmp_path / "spool.raw"
    spool.write_bytes(b"header--" + crops.tobytes())
    mapped = np.memmap(spool, dtype=np.uint8, mode="r", offset=8, shape=crops.shape)
    save_npy_chunked(tmp_path / "mapped.npy", mapped)
    save_npy_chunked(tmp_path / "plain.npy", crops)
    np.testing.assert_array_equal(np.load(tmp_path / "mapped.npy"), crops)
    np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), crops)


# VmHWM is this process image's own peak; ru_maxrss would carry the forking
# test process's peak over, and hide the growth.
_RSS_CHILD = """
import sys
import numpy as np
from pathlib import Path
from appliance.pipeline.slide_cache import save_npy_chunked
def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
spool = Path(sys.argv[1])
rows = spool.stat().st_size // (128 * 128 * 3)
crops = np.memmap(spool, dtype=np.uint8, mode="r", shape=(rows, 128, 128, 3))
before = peak_kb()
save_npy_chunked(spool.with_suffix(".npy"), crops)
print((peak_kb() - before) // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_copying_a_large_spool_does_not_raise_peak_memory(tmp_path: Path) -> None:
    """256 MB of crops (a 40,000 px slide has over a gigabyte) copied into the cache
    raise the process's peak RSS by a few MB, not by the spool's size."""
    spool = tmp_path / "spool.raw"
    block = np.random.default_rng(1).integers(0, 256, (64, 128, 128, 3), np.uint8).tobytes()
    with open(spool, "wb") as handle:
        for _ in range(82):  # 82 x 64 crops of 48 KiB: 258 MB
            handle.write(block)
    done = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(spool)],
        capture_output=True,
        text=True,
        check=True,
    )
    growth_mb = int(done.stdout.strip())
    assert growth_mb < 48, f"peak RSS grew by {growth_mb} MB copying a 258 MB spool"
    assert (tmp_path / "spool.npy").stat().st_size > spool.stat().st_size
