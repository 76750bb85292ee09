"""The project's top-level kernels/ folder must never shadow Hugging Face's `kernels` package, which transformers
imports: kernels/ has no __init__.py (a namespace portion loses to an installed regular package) and imports as
nanotulu.kernels through the link nanotulu/kernels -> ../kernels. Each check runs a fresh interpreter with the
repository root as its working directory, as `python -m pytest` and `python -m nanotulu.<script>` from the root do.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_transformers_imports_from_the_repository_root():
    p = run_python("import nanotulu.kernels, transformers; from transformers import LlamaForCausalLM", ROOT)
    assert p.returncode == 0, p.stderr[-3000:]


def test_top_level_kernels_is_never_the_project_folder():
    # what `import kernels` finds from the root: Hugging Face's package where installed, never <root>/kernels
    code = ("import importlib.util as u; s = u.find_spec('kernels'); "
            "print(s.origin if s and s.origin else 'namespace:' + ','.join(s.submodule_search_locations) if s else '')")
    p = run_python(code, ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    origin = p.stdout.strip()
    assert not origin.startswith(os.path.join(ROOT, "kernels", "")), origin
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert origin in ("",) or origin.startswith("namespace:"), origin
        return
    assert origin == str(dist.locate_file("kernels/__init__.py")), origin
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))


def test_nanotulu_kernels_import_from_a_copy_that_is_not_installed(tmp_path):
    # the GPU machine runs a copy of the working tree with nothing pip-installed: nanotulu.kernels must resolve
    # inside that copy (the link travels), not through this environment's editable install
    if not os.path.islink(os.path.join(ROOT, "nanotulu", "kernels")):
        pytest.fail("nanotulu/kernels must be a link to ../kernels")
    copy = tmp_path / "copy"
    shutil.copytree(ROOT, copy, symlinks=True, ignore=shutil.ignore_patterns(".git", "runs", "*.egg-info", "build",
                                                                            "__pycache__", ".venv", ".whl", "out"))
    p = run_python("import nanotulu.kernels.chunked_loss as c, nanotulu.kernels.linear_logprobs as t; "
                   "print(c.__file__); print(t.__file__)", copy)
    assert p.returncode == 0, p.stderr[-3000:]
    for line in p.stdout.split():
        assert os.path.realpath(line).startswith(os.path.realpath(copy)), line
