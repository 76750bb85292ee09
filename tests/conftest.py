# Triton runs on CPU only through its interpreter, which must be switched on before any @triton.jit
# function is defined, so before nanotulu.kernels is imported by any test module.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(min(4, os.cpu_count() or 1))


def pytest_sessionstart(session):
    """One line of the versions this environment resolved (CI installs like a new machine: what pip picks today)."""
    import importlib.metadata
    import platform

    found = [f"python {platform.python_version()}"]
    for dist in ("torch", "triton", "transformers", "kernels"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    session.config.pluginmanager.get_plugin("terminalreporter").write_line("versions: " + ", ".join(found))
