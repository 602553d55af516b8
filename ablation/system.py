"""What this process uses of the machine (for the summaries)."""

from __future__ import annotations

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
