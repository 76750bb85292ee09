"""The attention backend choice as CUDA would make it, read on CPU (issue 26, B2 and B3).

B2: the compiled decode step (generate(compile=True), fullgraph=True) must not trace the backend probes: on CUDA
they import flash_attn, and dynamo stops on an import failure inside a fullgraph region. Traced here with dynamo's
eager backend, the probes forced down their CUDA branch, against the eager decode's tokens.
B3: torch's and flash-attn's varlen kernels take fp16/bf16 only: fp32 q/k/v on CUDA must get a backend that runs.
"""

import pytest
import torch

from nanotulu import model as model_mod
from nanotulu.generate import generate
from nanotulu.model import LlamaConfig, build_model, pick_backend

CUDA = torch.device("cuda")  # a device object only: nothing runs on it
CPU = torch.device("cpu")


@pytest.mark.parametrize("varlen_here", [True, False])
def test_choice_refuses_varlen_for_fp32_on_cuda(monkeypatch, varlen_here):
    monkeypatch.setattr(model_mod, "_has_flash_attn", lambda: False)
    monkeypatch.setattr(model_mod, "_has_torch_varlen", lambda: varlen_here)
    fast = "varlen" if varlen_here else "flex"
    for dtype in (torch.bfloat16, torch.float16):
        assert pick_backend("auto", CUDA, dtype) == fast
        assert pick_backend("varlen", CUDA, dtype) == "varlen"
    assert pick_backend("auto", CUDA, torch.float32) == "flex"
    assert pick_backend("varlen", CUDA, torch.float32) == "flex"  # asked for, but it cannot run fp32
    for name in ("sdpa", "flex"):
        assert pick_backend(name, CUDA, torch.float32) == name
    for dtype in (torch.float32, torch.bfloat16):
        assert pick_backend("auto", CPU, dtype) == "sdpa"


def test_forward_passes_the_attention_dtype(monkeypatch):
    """Llama.forward asks with the dtype q/k/v will have: the parameters' without autocast, autocast's with it."""
    seen = []
    real = model_mod.pick_backend
    monkeypatch.setattr(model_mod, "pick_backend", lambda n, d, dt=None: seen.append(dt) or real(n, d, dt))
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    m = build_model(cfg, seed=0)
    ids = torch.randint(0, 32, (1, 5))
    m(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(ids)
    assert seen == [torch.float32, torch.bfloat16]


def test_compiled_decode_traces_no_backend_probe(monkeypatch):
    """generate(compile=True) under fullgraph=True with pick_backend answering as on CUDA, whose probe imports a
    module that is absent: the trace must not reach it (before the fix Llama.forward called pick_backend in the
    decode step and dynamo raised on the import). The compiled tokens equal the eager ones."""
    def probe_flash_attn():  # what _has_flash_attn does on a machine without flash-attn, uncached
        try:
            import nanotulu_no_such_module_flash_attn  # noqa: F401
            return True
        except ImportError:
            return False

    calls = []
    real = model_mod.pick_backend

    def as_on_cuda(name, device, dtype=None):
        calls.append(torch.compiler.is_compiling())
        probe_flash_attn()  # runs eagerly; dynamo cannot trace the failing import
        return real(name, CUDA) if dtype is None else real(name, CUDA, dtype)

    # the control: the patched choice cannot be traced under fullgraph, so the test below can fail
    with pytest.raises(Exception):
        torch.compile(lambda x: x + len(as_on_cuda("auto", CPU)), fullgraph=True, backend="eager")(torch.ones(1))
    calls.clear()
    monkeypatch.setattr(model_mod, "pick_backend", as_on_cuda)

    real_compile = torch.compile
    compiles = []

    def eager_compile(fn, **kw):  # dynamo's full trace, no inductor code generation (slow on 2 cores)
        compiles.append(kw)
        return real_compile(fn, **{**kw, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m = build_model(cfg, seed=3)
    prompts = [[5, 9, 11], [7, 2]]
    kw = dict(max_new_tokens=6, eos_token_id=-1, greedy=True, max_len=12)
    eager = generate(m, prompts, **kw)
    compiled = generate(m, prompts, compile=True, **kw)
    assert compiles and compiles[0].get("fullgraph") is True
    assert True not in calls  # never asked inside the compiled region
    assert [r["tokens"] for r in compiled] == [r["tokens"] for r in eager]
