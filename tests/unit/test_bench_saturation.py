"""The pure parts of `bench/gateway.py --saturate`: where the CPU cgroups go, what caps
them, when a ramp of offered load stopped growing, which level is reported as saturation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # gateway.py imports its sibling _mockproc
    try:
        spec = importlib.util.spec_from_file_location("bench_gateway", BENCH / "gateway.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


gateway = _load()

V1_MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V1_OWN = "4:cpuset:/\n3:cpu,cpuacct:/bench/job\n0::/\n"
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev 0 0\n"


def test_v1_cpu_hierarchy_under_the_processes_own_cgroup() -> None:
    root, version = gateway.cpu_cgroup_root(V1_MOUNTS, V1_OWN, "")
    assert (root, version) == (Path("/sys/fs/cgroup/cpu,cpuacct/bench/job"), 1)


def test_v1_wins_over_a_v2_mount_without_the_cpu_controller() -> None:
    """A hybrid layout (v1 controllers, an empty cgroup2 at unified) uses the v1 cpu one."""
    root, version = gateway.cpu_cgroup_root(V1_MOUNTS, "3:cpu,cpuacct:/\n", "memory pids")
    assert (root, version) == (Path("/sys/fs/cgroup/cpu,cpuacct"), 1)


def test_v2_needs_the_cpu_controller() -> None:
    own = "0::/user.slice/bench\n"
    root, version = gateway.cpu_cgroup_root(V2_MOUNTS, own, "cpuset cpu io memory pids")
    assert (root, version) == (Path("/sys/fs/cgroup/user.slice/bench"), 2)
    with pytest.raises(gateway.CpuCapError, match="no cgroup CPU controller"):
        gateway.cpu_cgroup_root(V2_MOUNTS, own, "cpuset io memory pids")
    with pytest.raises(gateway.CpuCapError):
        gateway.cpu_cgroup_root(V2_MOUNTS, own, None)  # cgroup.controllers unreadable


def test_no_cgroup_at_all_is_a_typed_error() -> None:
    with pytest.raises(gateway.CpuCapError):
        gateway.cpu_cgroup_root("proc /proc proc rw 0 0\n", "", None)


def test_cap_files() -> None:
    assert gateway.cap_files(1, 0.3, 20_000) == {
        "cpu.cfs_period_us": "20000",
        "cpu.cfs_quota_us": "6000",
    }
    assert gateway.cap_files(2, 0.25, 100_000) == {"cpu.max": "25000 100000"}
    for cores in (0.0, -1.0, 0.01):  # 0.01 x 20 ms = 0.2 ms, under the kernel's 1 ms
        with pytest.raises(ValueError, match="CPU cap"):
            gateway.cap_files(1, cores, 20_000)


def test_saturated_needs_two_steps_without_growth() -> None:
    assert not gateway.saturated([1000.0, 2000.0])
    assert not gateway.saturated([1000.0, 2000.0, 3000.0])
    # One flat step is not enough (noise): the next one grows again.
    assert not gateway.saturated([1000.0, 2000.0, 2010.0, 3000.0])
    assert gateway.saturated([1000.0, 2000.0, 2010.0, 2050.0])
    assert gateway.saturated([1000.0, 2000.0, 1900.0, 1950.0])
    assert not gateway.saturated([1000.0, 2000.0, 1900.0, 2200.0])


def test_saturation_level_is_the_highest_held_in_half_of_the_runs() -> None:
    held = [
        [True, True, True, False],
        [True, True, False, True],
        [False, True, True],  # a ramp that ended early
    ]
    assert gateway.saturation_level(held) == 2  # level 3 held in one run of three only
    assert gateway.saturation_level([[True, False], [False, True]]) == 1  # half is enough
    assert gateway.saturation_level([[True, False], [True, True], [False, False]]) == 0
    assert gateway.saturation_level([[False, True], [False, False], [True, False]]) is None
    assert gateway.saturation_level([[False], [False]]) is None
    assert gateway.saturation_level([]) is None


def test_a_cpu_ratio_over_a_peer_measured_at_zero_ticks_is_not_a_number() -> None:
    """A short run of a cheap server can use less than one /proc tick of CPU: its ratio is
    "n/a", not a division by zero that ends the bench."""
    assert gateway.cpu_ratio(24.9, 16.4, 2) == "1.52x"
    assert gateway.cpu_ratio(521.0, 24.9, 1) == "20.9x"
    assert gateway.cpu_ratio(99.5, 0.0, 2) == "n/a"
