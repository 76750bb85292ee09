"""The CPU cores this process may use, and torch's thread count from them: one place for the trainers (threads)
and the tokenizer pool (workers)."""

import os

import torch


def cpu_cores(physical=True):
    """CPU cores this process may use: the CPUs of its affinity mask, within the container's CPU quota (cgroup v2
    cpu.max), counting hyper-threads of one core once when `physical` (two threads on one core share its vector
    units: matmuls gain nothing, and each extra thread adds synchronisation)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = len(cpus)
    if physical:
        cores = set()
        try:
            for c in cpus:
                topo = f"/sys/devices/system/cpu/cpu{c}/topology/"
                with open(topo + "core_id") as f, open(topo + "physical_package_id") as g:
                    cores.add((g.read().strip(), f.read().strip()))
            n = len(cores)
        except OSError:
            pass  # no sysfs topology: every CPU counts
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_threads(n=0):
    """torch's CPU threads: n, or with n = 0 the physical cores shared by the processes torchrun started on this
    node (LOCAL_WORLD_SIZE). Applied by every trainer: torch's own default (all logical CPUs; 1 per process under
    torchrun with several) oversubscribes a shared or hyper-threaded machine, where an SFT step can take 50x
    longer while threads wait on each other. Returns the count set."""
    if n <= 0:
        n = max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
