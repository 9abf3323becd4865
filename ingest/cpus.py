"""How many CPUs this process may really use: the default for every worker count (thumbnail
decoders, ffmpeg processes and their threads).

``os.cpu_count()`` is the node's core count: in a pod limited to 2 CPUs on a 64-core node it
says 64, and 64 Pillow processes under a 2 GiB limit get throttled or OOM-killed. The real
figure is the smallest of: the CPUs this process may run on (``sched_getaffinity``: taskset,
cpusets, systemd ``CPUAffinity=``) and the cgroup's CPU quota (cgroup v2 ``cpu.max`` of this
process's cgroup and its ancestors, e.g. a Kubernetes CPU limit or systemd ``CPUQuota=``;
cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the ``cpu`` hierarchy's cgroup and
its ancestors, on v1 and hybrid hosts; each hierarchy found through /proc/self/mountinfo).
A quota of 2.5 CPUs is 2 (rounded down, at least 1): a process pool sized above the quota is
throttled, not faster.

The same cgroup directories give the worker's memory metrics (``cgroup_memory``): the memory
a limit counts includes the child processes, which the process's own RSS does not.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
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


def own_cgroup_v1(proc_self_cgroup: str, controller: str) -> tuple[str, str] | None:
    """(controllers, path) of the cgroup v1 hierarchy carrying ``controller``, from a
    ``/proc/self/cgroup`` line like "4:cpu,cpuacct:/kubepods/pod1/ctr"."""
    for line in proc_self_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) == 3 and parts[0] != "0" and controller in parts[1].split(","):
            return parts[1], parts[2].strip() or "/"
    return None


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes a space in a path as \\040 (and tab, newline, backslash alike)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def cgroup_mount(mountinfo: str, controller: str | None) -> tuple[str, Path] | None:
    """(root within the hierarchy, mount point) of the cgroup v2 mount (``controller`` None)
    or of the v1 mount carrying ``controller``, from ``/proc/self/mountinfo`` ("36 25 0:30
    /kubepods /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct")."""
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        fstype, options = rest[0], rest[2].split(",")
        if (controller is None and fstype == "cgroup2") or (
            controller is not None and fstype == "cgroup" and controller in options
        ):
            return _unescape(fields[3]), Path(_unescape(fields[4]))
    return None


def cgroup_dirs(
    proc_self_cgroup: str, mountinfo: str, controller: str | None, root: Path = CGROUP_ROOT
) -> list[Path]:
    """This process's cgroup directories, its own first, then every ancestor up to the
    hierarchy's mount: cgroup v2 (``controller`` None) or the v1 hierarchy of ``controller``
    (pure v1 and hybrid hosts). The path in /proc/self/cgroup is relative to the hierarchy's
    root; the mount may show only part of it (a container sees its own cgroup as the mount's
    root): the part under the mount's root is walked, else the mount point alone (the
    container's own cgroup). Without mountinfo, the usual places under ``root``."""
    if controller is None:
        own, where = own_cgroup_v2(proc_self_cgroup), root
    else:
        found = own_cgroup_v1(proc_self_cgroup, controller)
        if found is None:
            return []
        own, where = found[1], root / found[0]
    if own is None:
        return []
    mount = cgroup_mount(mountinfo, controller)
    rel = own.strip("/")
    if mount is not None:
        mount_root, where = mount[0].strip("/"), mount[1]
        if mount_root:
            rel = (
                rel[len(mount_root) :].strip("/")
                if (rel + "/").startswith(mount_root + "/")
                else ""
            )
    path = Path(rel)
    return [where / d for d in [path, *path.parents]] if rel else [where]


def cgroup_quotas(
    read: Callable[[Path], str | None], root: Path = CGROUP_ROOT
) -> list[float | None]:
    """Every CPU quota on the way from this process's cgroup up to its hierarchy's mount: the
    v2 ``cpu.max`` files, and the v1 ``cpu`` hierarchy's cfs quotas (v1 or hybrid hosts)."""
    own = read(Path("/proc/self/cgroup")) or ""
    mountinfo = read(Path("/proc/self/mountinfo")) or ""
    quotas: list[float | None] = []
    for d in cgroup_dirs(own, mountinfo, None, root):
        text = read(d / "cpu.max")
        if text is not None:
            quotas.append(quota_cpus_v2(text))
    v1 = cgroup_dirs(own, mountinfo, "cpu", root) or [root / "cpu,cpuacct", root / "cpu"]
    for d in v1:
        quota, period = read(d / "cpu.cfs_quota_us"), read(d / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            quotas.append(quota_cpus_v1(quota, period))
    return quotas


UNLIMITED_V1_BYTES = 1 << 60  # v1 writes "no limit" as a huge page-aligned number


@dataclass(frozen=True, slots=True)
class CgroupMemory:
    """This process's cgroup memory (its children included: Pillow decoders, ffmpeg), which is
    what the OOM killer and a Kubernetes limit count, unlike the process's own RSS."""

    usage_bytes: int | None  # memory.current (v2) / memory.usage_in_bytes (v1)
    working_set_bytes: int | None  # usage minus inactive file cache (cAdvisor's working set)
    limit_bytes: int | None  # the tightest limit up the cgroup's ancestors; None: unlimited


def _bytes(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:  # "max" (v2: no limit) or junk
        return None


def _stat(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _bytes(value) or 0
    return 0


def cgroup_memory(read: Callable[[Path], str | None], root: Path = CGROUP_ROOT) -> CgroupMemory:
    """Usage, working set and limit of this process's memory cgroup (v2, else v1's memory
    hierarchy); all None outside a cgroup that accounts memory."""
    own = read(Path("/proc/self/cgroup")) or ""
    mountinfo = read(Path("/proc/self/mountinfo")) or ""
    v2 = cgroup_dirs(own, mountinfo, None, root)
    if v2 and read(v2[0] / "memory.current") is not None:
        dirs, usage_file, limit_file, inactive = v2, "memory.current", "memory.max", "inactive_file"
    else:
        dirs = cgroup_dirs(own, mountinfo, "memory", root)
        usage_file, limit_file = "memory.usage_in_bytes", "memory.limit_in_bytes"
        inactive = "total_inactive_file"
    if not dirs:
        return CgroupMemory(None, None, None)
    usage = _bytes(read(dirs[0] / usage_file))
    limits = [_bytes(read(d / limit_file)) for d in dirs]
    real = [n for n in limits if n is not None and 0 < n < UNLIMITED_V1_BYTES]
    working = None
    if usage is not None:
        working = max(usage - _stat(read(dirs[0] / "memory.stat"), inactive), 0)
    return CgroupMemory(usage, working, min(real) if real else None)


def read_text(path: Path) -> str | None:
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
    return usable_cpus(os.cpu_count() or 1, _affinity(), cgroup_quotas(read_text))
