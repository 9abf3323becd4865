"""Worker-count defaults from the CPUs a process may really use (cgroup quota, affinity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.cpus import (
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
