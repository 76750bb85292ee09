"""bench/gpu_suite.py --cpu-smoke from a copy of the repository that is not pip-installed (as on the GPU machine):
every step runs on tiny shapes (the GPU tests skip), nanotulu and nanotulu.kernels import from the copy, and the
Markdown table, JSON file and step logs are written. This environment's editable install is hidden from every
step (a sitecustomize drops its import finder), so a module reachable only through an install fails here as it
would there. The SFT/DPO step bench is left to test_bench_step.py, which checks its profile too."""

import ast
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# drops setuptools' editable-install finders (a meta-path finder and a path hook): only the copy remains
HIDE_EDITABLE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if not p.startswith("__editable__")]
"""


def test_step_limits_fit_the_budget():
    tree = ast.parse(open(os.path.join(ROOT, "bench", "gpu_suite.py")).read())
    consts = {n.targets[0].id: n.value for n in tree.body if isinstance(n, ast.Assign)
              and isinstance(n.targets[0], ast.Name)}
    budget = eval(compile(ast.Expression(consts["BUDGET_S"]), "b", "eval"))
    assert budget <= 7 * 60
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gpu_suite
    finally:
        sys.path.pop(0)
    for smoke in (False, True):
        plan = gpu_suite.steps(smoke, "/tmp/x")
        if not smoke:
            assert sum(limit for _, _, limit in plan) + gpu_suite.STARTUP_S <= budget
        names = [n for n, _, _ in plan]
        # the extension is built, and the values checked, before any timed step
        order = [names.index(n) for n in ("packing extension build", "fused losses", "SFT/DPO step, 1B shape")]
        assert order == sorted(order)
        assert "--check" in dict((n, c) for n, c, _ in plan)["fused losses"]


def test_gpu_suite_cpu_smoke_from_a_copy_not_installed(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ROOT, copy, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "runs", "*.egg-info", "build", "__pycache__", ".venv", "*.whl", "out", ".pytest_cache"))
    assert os.path.islink(copy / "nanotulu" / "kernels")
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_EDITABLE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(hide)
    # the control: with the finder hidden and the copy not on the path, nanotulu cannot be imported at all
    p = subprocess.run([sys.executable, "-c", "import nanotulu"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "No module named 'nanotulu'" in p.stderr, p.stderr[-2000:]

    out = tmp_path / "out"
    only = ["environment", "packing", "losses", "generation", "DPO step vs", "RLVR", "CUDA tests", "report"]
    p = subprocess.run([sys.executable, str(copy / "bench" / "gpu_suite.py"), str(out), "--cpu-smoke", "--only", *only],
                       cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((out / "suite.json").read_text())["results"]
    assert [r["step"] for r in results] == ["environment", "packing extension build", "fused losses", "generation",
                                            "DPO step vs padded baseline", "RLVR step split", "CUDA tests",
                                            "kernels sm_90a report"]
    for r in results:
        assert r["rc"] == 0, (r["step"], r["output"][-2000:])
    env_out = results[0]["output"]
    for module in ("nanotulu", "nanotulu.kernels.rows"):
        assert f"{module} from {os.path.realpath(copy)}" in env_out, env_out
    assert "skipped" in results[6]["output"]  # no GPU here: the CUDA tests ran and skipped
    losses = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    checks = [r for r in losses if "check" in r]
    assert checks and all(r["result"] == "ok" or r["result"].startswith("skipped") for r in checks), checks
    assert any(r.get("two_runs_bitwise_equal") is True for r in checks)
    assert {r["piece"] for r in losses if "piece" in r} == {"logits mm", "row stats", "row grad", "dX mm", "dW addmm"}
    timed = [r for r in losses if "method" in r and r["ms"] != "-"]
    assert timed and all(r["model_ms"] != "-" for r in timed)
    assert (out / "cache").is_dir() and list(out.glob("*-fused-losses.log"))
    table = (out / "suite.md").read_text()
    assert "| fused losses |" in table and "| RLVR step split |" in table
