"""What this process uses of the machine (for the summaries)."""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path


def peak_rss() -> int:
    """This process's high-water RSS in bytes. VmHWM belongs to the current program image;
    ru_maxrss would also count a parent's memory inherited across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve every allocation above `nbytes` with its own mmap, returned to the system when
    freed. glibc otherwise raises its mmap threshold after each large free, so tensor buffers of
    a few MB move into the heap, where freed memory stays resident and the peak creeps up with
    the number of tensors processed (seen: +6-10% from 2 to 8.6 GB). No-op off glibc."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def human_bytes(n: float) -> str:
    """A size as people read it (decimal units, as disks and the Hub count): 512 bytes,
    12.3 KB, 540 MB, 1.75 GB."""
    if n < 1000:
        return f"{int(n)} byte" + ("" if int(n) == 1 else "s")
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.5 or unit == "TB":
            digits = 2 if n < 9.995 else 1 if n < 99.95 else 0
            return f"{n:.{digits}f} {unit}"
    raise AssertionError("unreachable")
