"""bench/gpu_suite.py --cpu-smoke: every step of the GPU suite runs on a CPU on tiny shapes (the GPU tests skip),
so the suite cannot rot between GPU sessions; its Markdown table and JSON file are written. The SFT/DPO step bench
is left to test_bench_step.py, which checks its profile too."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_cpu_smoke(tmp_path):
    only = ["environment", "CUDA tests", "report", "losses", "DPO step vs", "generation", "RLVR"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), str(tmp_path), "--cpu-smoke",
                        "--only", *only], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "suite.json").read_text())["results"]
    assert [r["step"] for r in results] == ["environment", "CUDA tests", "kernels sm_90a report", "fused losses",
                                            "DPO step vs padded baseline", "generation", "RLVR step split"]
    for r in results:
        assert r["rc"] == 0, (r["step"], r["output"][-2000:])
    assert "skipped" in results[1]["output"]  # no GPU here: the CUDA tests ran and skipped
    table = (tmp_path / "suite.md").read_text()
    assert "| fused losses |" in table and "| RLVR step split |" in table
