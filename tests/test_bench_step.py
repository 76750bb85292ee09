"""bench/bench_step.py --cpu-smoke end to end (the GPU run is the benchmark; this checks the script and its profile
breakdown on a tiny model): both stages run, print their figures, and the breakdown finds the step's parts."""

import importlib.util
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "bench_step.py")


@pytest.fixture(scope="module")
def bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke(bench_step, capsys):
    results = bench_step.main(["--cpu-smoke", "--seq_len", "96"])
    out = capsys.readouterr().out
    assert [r["stage"] for r in results] == ["sft", "dpo"]
    for r in results:
        assert r["rows"] == 2 and r["tok/s"] > 0 and r["real_tok/s"] <= r["tok/s"] and r["peak_gib"] > 0
        times, top = r["profile"]
        total = sum(times.values())
        assert total > 0 and top
        # on a CPU every group but communication has ops in a step (one process: no collectives)
        for group in ("attention", "matmuls", "loss", "norms", "optimizer"):
            assert times[group] > 0, (r["stage"], group, dict(times))
    for line in ("== SFT step", "== DPO step", "tok/s (row capacity)", "MFU", "peak memory", "attention", "matmuls",
                 "loss", "norms", "optimizer", "communication", "other"):
        assert line in out


def test_group_names(bench_step):
    g = bench_step.group_of
    assert g(["sm90_xmma_gemm_bf16bf16_bf16f32", "aten::mm"]) == "matmuls"
    assert g(["nvjet_tst_128x256", "aten::mm", "autograd::engine::evaluate_function: _LinearLogprobsFnBackward"]) \
        == "loss"
    assert g(["flash_fwd_kernel", "aten::_flash_attention_forward"]) == "attention"
    assert g(["triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0"]) == "norms"
    assert g(["multi_tensor_apply_kernel", "aten::_fused_adamw_", "Optimizer.step#AdamW.step"]) == "optimizer"
    assert g(["ncclDevKernel_ReduceScatter_Sum_f32", "FSDP::post_backward_reduce"]) == "communication"
    assert g(["triton_poi_fused_mul_silu_0"]) == "other"
