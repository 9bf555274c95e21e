"""torch's threads fitted to the cores this process may use and to what else is running on them.

A head on stored features runs thousands of tiny matrix products; with two threads each one waits
for the other, and when another process holds one of the cores an epoch took 21x longer than on
one thread (benchmark 10). Its results are bitwise the same at any thread count (MKL's strict mode;
tests/unit/test_threads.py), so its threads may follow the load. A convolution's backward pass is
not thread-invariant, so end-to-end training keeps torch's fixed count: same seed, same figures.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """The CPU quota in cores (`docker --cpus`, a Kubernetes limit), cgroup v2 or v1; None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores(root: Path = CGROUP) -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's quota."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_quota(root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, all


def idle_cores(sample_s: float = 0.1) -> float | None:
    """How many of the machine's cores were idle over a short sample (None where /proc/stat is not readable)."""
    before = _cpu_times()
    time.sleep(sample_s)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def threads_for(cores: int, idle: float | None) -> int:
    """The idle cores of those available, at least one; every available core when idleness is unknown."""
    return cores if idle is None else max(1, min(cores, round(idle)))


def head_threads() -> int:
    """Threads for training a head on stored features: the available cores that are idle now."""
    return threads_for(available_cores(), idle_cores())


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then put back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
