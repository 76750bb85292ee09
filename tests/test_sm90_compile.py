"""Every Triton kernel of nanotulu compiled for sm_90a (H100/H200) by the real Triton compiler, no GPU needed, at
the configurations its launchers use on a GPU and with a real launch's specialisations (aligned pointers, sizes
divisible by 16): none may spill to local memory (stack bytes > 0), and the tile kernels must use Hopper's wgmma.
Runs `python -m nanotulu.kernels.report --json` in a subprocess without TRITON_INTERPRET (conftest.py sets it for
the other tests; interpreted kernels cannot be compiled).
"""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the current default, stated to silence triton 3.9's warning
    out = subprocess.run([sys.executable, "-m", "nanotulu.kernels.report", "--json"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    return lines[:-1], lines[-1]["all_kernels"]


def test_every_kernel_compiled(report):
    rows, kernels = report
    assert set(kernels) <= {r["kernel"] for r in rows}, "a @triton.jit kernel has no GPU configuration in the report"
    assert len(kernels) >= 4


def test_no_local_memory_spills(report):
    rows, _ = report
    spills = [(r["kernel"], r["config"], r["registers"], r["stack_bytes"]) for r in rows if r["stack_bytes"] > 0]
    assert not spills, spills
    assert all(r["registers"] <= 255 for r in rows)


def test_tile_kernels_use_wgmma(report):
    rows, _ = report
    for r in rows:
        if r["kernel"].startswith("linear_logprobs."):
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, r


def test_report_compiles_what_a_launch_runs(report):
    """With a launch's specialisations (aligned pointers, sizes divisible by 16) the tile kernels pipeline their
    loads (cp.async) and the row kernels load 16 bytes at a time; the unhinted compile shows neither, so these
    fail if the report stops passing them."""
    rows, _ = report
    assert all(r["hinted"] for r in rows)
    for r in rows:
        if r["kernel"].startswith("linear_logprobs."):
            assert r["cp_async"] > 0, r
        else:
            assert r["vector_loads"] > 0, r
