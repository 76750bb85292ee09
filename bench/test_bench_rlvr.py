"""bench_rlvr.py --cpu-smoke runs one timed RLVR step end to end (the GPU figures come from the same code)."""
import json

import bench_rlvr


def test_bench_rlvr_cpu_smoke(tmp_path):
    fig = bench_rlvr.main(["--cpu-smoke", "--json", str(tmp_path / "fig.json")])
    assert fig["new_tokens"] == 2 * 4 * 16  # no EOS: every answer runs to --new_tokens
    assert set(fig["seconds"]) == {"rollout", "score", "build_rows (old + ref log-probs)",
                                   "update (GRPO fwd + bwd + step)"}
    assert all(s > 0 for s in fig["seconds"].values()) and 0 < fig["generation_share"] < 1
    assert json.loads((tmp_path / "fig.json").read_text())["prompts"] == 2
