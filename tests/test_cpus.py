"""Worker-count defaults from the CPUs a process may really use (cgroup quota, affinity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.cpus import (
    cgroup_dirs,
    cgroup_mount,
    cgroup_quotas,
    own_cgroup_v2,
    quota_cpus_v1,
    quota_cpus_v2,
    usable_cpus,
)


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2.0), ("50000 100000", 0.5),
     ("150000", 1.5), ("", None), ("junk 100000", None), ("0 100000", None)],
)  # fmt: skip
def test_cgroup_v2_cpu_max(cpu_max: str, cpus: float | None) -> None:
    assert quota_cpus_v2(cpu_max) == cpus


def test_cgroup_v1_quota() -> None:
    assert quota_cpus_v1("-1\n", "100000\n") is None
    assert quota_cpus_v1("250000\n", "100000\n") == 2.5
    assert quota_cpus_v1("", "100000") is None


def test_the_fewest_of_cores_affinity_and_every_quota_rounded_down() -> None:
    assert usable_cpus(64, None, [2.0]) == 2  # a 2-CPU pod limit on a 64-core node
    assert usable_cpus(64, 8, [None]) == 8  # taskset / cpuset
    assert usable_cpus(64, 8, [2.5, 4.0]) == 2
    assert usable_cpus(64, 64, [0.5]) == 1  # 500m: at least one
    assert usable_cpus(4, None, []) == 4


def test_the_quota_is_read_up_the_process_cgroup_and_from_v1(tmp_path: Path) -> None:
    files = {
        Path("/proc/self/cgroup"): "0::/kubepods/pod1/ctr\n",
        tmp_path / "kubepods/pod1/ctr/cpu.max": "max 100000\n",
        tmp_path / "kubepods/pod1/cpu.max": "300000 100000\n",  # the pod's limit
        tmp_path / "kubepods/cpu.max": "max 100000\n",
    }
    assert cgroup_quotas(files.get, tmp_path) == [None, 3.0, None]
    assert usable_cpus(64, 64, cgroup_quotas(files.get, tmp_path)) == 3
    v1 = {
        tmp_path / "cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
        tmp_path / "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    assert cgroup_quotas(v1.get, tmp_path) == [2.0]
    namespaced = {Path("/proc/self/cgroup"): "0::/\n", tmp_path / "cpu.max": "100000 100000"}
    assert cgroup_quotas(namespaced.get, tmp_path) == [1.0]  # a container's own root
    assert own_cgroup_v2("12:cpu:/x\n") is None


def test_every_worker_default_uses_it() -> None:
    """No pool sizes itself from os.cpu_count() directly."""
    root = Path(__file__).resolve().parent.parent / "ingest"
    users = [p.name for p in root.rglob("*.py") if "os.cpu_count(" in p.read_text()]
    assert users == ["cpus.py"]


V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
"""


def test_cgroup_v1_is_read_up_the_process_cgroup_not_at_the_root() -> None:
    """A v1 host (an older Kubernetes node): the pod's quota is on the pod's cgroup, not on
    the hierarchy's root (which has none)."""
    own = "11:memory:/kubepods/pod1/ctr\n4:cpu,cpuacct:/kubepods/pod1/ctr\n1:name=systemd:/x\n"
    mp = Path("/sys/fs/cgroup/cpu,cpuacct")
    files = {
        Path("/proc/self/cgroup"): own,
        Path("/proc/self/mountinfo"): V1_MOUNTS,
        mp / "kubepods/pod1/ctr/cpu.cfs_quota_us": "-1\n",
        mp / "kubepods/pod1/ctr/cpu.cfs_period_us": "100000\n",
        mp / "kubepods/pod1/cpu.cfs_quota_us": "150000\n",  # the pod's limit: 1.5 CPUs
        mp / "kubepods/pod1/cpu.cfs_period_us": "100000\n",
        mp / "cpu.cfs_quota_us": "-1\n",
        mp / "cpu.cfs_period_us": "100000\n",
    }
    assert cgroup_quotas(files.get) == [None, 1.5, None]
    assert usable_cpus(64, 64, cgroup_quotas(files.get)) == 1
    assert cgroup_dirs(own, V1_MOUNTS, "memory")[0] == Path(
        "/sys/fs/cgroup/memory/kubepods/pod1/ctr"
    )


def test_cgroup_v1_in_a_container_whose_mount_is_its_own_cgroup() -> None:
    """Docker without a cgroup namespace: /proc/self/cgroup names the host path, the mount's
    root is that same cgroup; with a namespace, "/" and "/": the mount point is ours."""
    mounts = "40 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    assert cgroup_dirs("3:cpu:/docker/abc\n", mounts, "cpu") == [Path("/sys/fs/cgroup/cpu")]
    nested = cgroup_dirs("3:cpu:/docker/abc/inner\n", mounts, "cpu")
    assert nested == [Path("/sys/fs/cgroup/cpu/inner"), Path("/sys/fs/cgroup/cpu")]
    other = cgroup_dirs("3:cpu:/elsewhere\n", mounts, "cpu")  # not under the mount's root
    assert other == [Path("/sys/fs/cgroup/cpu")]
    spaced = "40 31 0:29 / /mnt/cg\\040x rw - cgroup cgroup rw,cpu\n"
    assert cgroup_mount(spaced, "cpu") == ("/", Path("/mnt/cg x"))


def test_a_hybrid_host_reads_the_cpu_quota_from_v1() -> None:
    """systemd's hybrid layout: cgroup2 at /sys/fs/cgroup/unified (no controllers), the cpu
    controller on v1."""
    mounts = V1_MOUNTS + "30 31 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    own = "4:cpu,cpuacct:/system.slice/ingest.service\n0::/system.slice/ingest.service\n"
    mp = Path("/sys/fs/cgroup/cpu,cpuacct/system.slice/ingest.service")
    files = {
        Path("/proc/self/cgroup"): own,
        Path("/proc/self/mountinfo"): mounts,
        mp / "cpu.cfs_quota_us": "200000\n",  # CPUQuota=200%
        mp / "cpu.cfs_period_us": "100000\n",
    }
    assert cgroup_dirs(own, mounts, None)[0] == Path(
        "/sys/fs/cgroup/unified/system.slice/ingest.service"
    )
    assert cgroup_quotas(files.get) == [2.0]


def test_cgroup_memory_v2_counts_the_cgroup_and_its_tightest_limit() -> None:
    from ingest.cpus import CgroupMemory, cgroup_memory

    root = Path("/sys/fs/cgroup")
    files = {
        Path("/proc/self/cgroup"): "0::/kubepods/pod1/ctr\n",
        Path("/proc/self/mountinfo"): "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        root / "kubepods/pod1/ctr/memory.current": "1500000000\n",
        root / "kubepods/pod1/ctr/memory.stat": "anon 900000000\ninactive_file 400000000\n",
        root / "kubepods/pod1/ctr/memory.max": "max\n",
        root / "kubepods/pod1/memory.max": "2147483648\n",  # the pod's 2 GiB limit
        root / "kubepods/memory.max": "max\n",
    }
    assert cgroup_memory(files.get) == CgroupMemory(1_500_000_000, 1_100_000_000, 2**31)


def test_cgroup_memory_v1_and_none_outside_a_cgroup() -> None:
    from ingest.cpus import CgroupMemory, cgroup_memory

    mp = Path("/sys/fs/cgroup/memory/docker/abc")
    files = {
        Path("/proc/self/cgroup"): "11:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
        Path("/proc/self/mountinfo"): V1_MOUNTS,
        mp / "memory.usage_in_bytes": "300\n",
        mp / "memory.stat": "cache 200\ntotal_inactive_file 100\n",
        mp / "memory.limit_in_bytes": "9223372036854771712\n",  # v1's "unlimited"
    }
    assert cgroup_memory(files.get) == CgroupMemory(300, 200, None)
    assert cgroup_memory({}.get) == CgroupMemory(None, None, None)
