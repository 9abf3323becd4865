"""How many CPUs this process may really use: the default for every worker count (thumbnail
decoders, ffmpeg processes and their threads).

``os.cpu_count()`` is the node's core count: in a pod limited to 2 CPUs on a 64-core node it
says 64, and 64 Pillow processes under a 2 GiB limit get throttled or OOM-killed. The real
figure is the smallest of: the CPUs this process may run on (``sched_getaffinity``: taskset,
cpusets, systemd ``CPUAffinity=``) and the cgroup's CPU quota (cgroup v2 ``cpu.max`` of this
process's cgroup and its ancestors, e.g. a Kubernetes CPU limit or systemd ``CPUQuota=``;
cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``). A quota of 2.5 CPUs is 2 (rounded
down, at least 1): a process pool sized above the quota is throttled, not faster.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus_v2(cpu_max: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` ("$MAX $PERIOD"; "max" = no limit)."""
    parts = cpu_max.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = float(parts[0])
        period = float(parts[1]) if len(parts) > 1 else 100_000.0
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_cpus_v1(cfs_quota_us: str, cfs_period_us: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 = none)."""
    try:
        quota, period = float(cfs_quota_us.strip()), float(cfs_period_us.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(cores: int, affinity: int | None, quotas: list[float | None]) -> int:
    """The CPUs worker defaults are sized to: the fewest of the cores, the affinity set and
    every quota found (rounded down), at least 1."""
    n = min(cores, affinity) if affinity else cores
    for q in quotas:
        if q is not None and math.isfinite(q):
            n = min(n, max(1, math.floor(q)))
    return max(1, n)


def own_cgroup_v2(proc_self_cgroup: str) -> str | None:
    """This process's cgroup v2 path from ``/proc/self/cgroup`` (the "0::/path" line)."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def cgroup_quotas(
    read: Callable[[Path], str | None], root: Path = CGROUP_ROOT
) -> list[float | None]:
    """Every CPU quota on the way from this process's cgroup up to the root (v2), plus v1's."""
    quotas: list[float | None] = []
    own = own_cgroup_v2(read(Path("/proc/self/cgroup")) or "")
    if own is not None:
        rel = Path(own.lstrip("/"))
        for d in [rel, *rel.parents]:
            text = read(root / d / "cpu.max")
            if text is not None:
                quotas.append(quota_cpus_v2(text))
    for v1 in ("cpu", "cpu,cpuacct"):
        quota, period = read(root / v1 / "cpu.cfs_quota_us"), read(root / v1 / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            quotas.append(quota_cpus_v1(quota, period))
            break
    return quotas


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


def _affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return None


@functools.cache
def available_cpus() -> int:
    """This process's usable CPUs (read once: limits do not change under a running process
    in practice, and every pool is sized at start)."""
    return usable_cpus(os.cpu_count() or 1, _affinity(), cgroup_quotas(_read))
