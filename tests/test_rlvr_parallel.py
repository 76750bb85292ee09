"""RLVR on several processes (gloo, CPU, fp32): the GRPO step on a (dp, tp) mesh equals the one-process step on the
same fixed rollouts, with ranks whose rollouts pack into different numbers of rows (every rank runs the same number
of forwards and backwards: the row count is agreed and padded); a 2-process torchrun run killed and resumed equals
the uninterrupted one."""

import dataclasses
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from nanotulu import data, parallel, run
from nanotulu.model import LlamaConfig, build_model
from nanotulu.generate import generate
from nanotulu.algos.grpo import GRPO_SUMS, GRPOParams, build_rows, group_advantages, update
from nanotulu.algos.rollout import RolloutParams, UpdateSchedule, rollout
from nanotulu.flags import pick


@dataclasses.dataclass
class RLParams(GRPOParams, UpdateSchedule, RolloutParams):
    """This test's RLVR settings in one place; each call takes its algorithm's dataclass of them (pick)."""

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True)
CAPACITY = 128  # divides by tp = 2 (sequence parallel)
N = 2  # samples per prompt
# groups 0 and 2 (dp rank 0 of 2) have long answers: one sequence a row, 4 rows; groups 1 and 3 (dp rank 1) short
# ones: two sequences a row, 2 rows. Rewards: spread groups, an equal non-dyadic group (advantage exactly 0, KL only)
GROUPS = [("What is 12 + 30? Think step by step.", ["12 + 30: 2 + 0 = 2, 1 + 3 = 4, so 42.", "It is 42, I think so."],
           [10.0, 0.0]),
          ("Hi?", ["hello", "HELLO!"], [2 / 3 * 10, 2 / 3 * 10]),
          ("Write one short sentence in lowercase.", ["the cat sat on the mat, quietly and well.",
                                                     "The Cat Sat On The Mat, Loudly And Badly."], [10.0, 0.3]),
          ("Count.", ["1 2 3", "one, two"], [0.1 * 3, 1.0])]


def rollouts(tok, groups):
    prompts = [tok.encode(f"<|user|>\n{p}\n<|assistant|>\n") for p, _, _ in groups for _ in range(N)]
    outs = [{"tokens": tok.encode(a) + [tok.eos_token_id]} for _, answers, _ in groups for a in answers]
    return prompts, outs, torch.tensor([r for _, _, rs in groups for r in rs])


class RecordingSGD(torch.optim.SGD):
    """Plain SGD (linear in the gradient) that keeps the full gradients of each step."""

    def __init__(self, named_params, lr):
        names, params = zip(*named_params)
        super().__init__(params, lr=lr)
        self.names, self.grads = [n.replace("_checkpoint_wrapped_module.", "") for n in names], []

    def step(self):
        params = self.param_groups[0]["params"]
        full = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in params]
        self.grads.append({n: g.detach().clone() for n, g in zip(self.names, full)})
        super().step()


def grpo_step(model, ref_model, groups, cfg, mesh):
    """One RLVR step on fixed rollouts: advantages, padded rows with old/reference log-probs, the update.
    -> (GRPO_SUMS summed over the dp ranks, gradients of each optimizer step, this rank's row count)."""
    opt = RecordingSGD(model.named_parameters(), lr=0.3)  # before any forward, as in main (FSDP's sharded params)
    tok = data.load_tokenizer("byte")
    prompts, outs, rew = rollouts(tok, groups)
    adv, _ = group_advantages(rew, N)
    device = torch.device("cpu")
    hp = pick(GRPOParams, cfg)
    rows = build_rows(model, ref_model, prompts, outs, adv, list(range(len(outs))), hp, CAPACITY, tok.pad_token_id,
                      device, False, parallel.tp_group(mesh))
    sums, _, _ = update(model, opt, rows, hp, pick(UpdateSchedule, cfg), 0, mesh, device, False)
    return parallel.all_reduce_sum(sums, parallel.dp_group(mesh)), opt.grads, len(rows)


CFG = dataclasses.replace(RLParams(), num_samples=N, beta=0.05, kl_estimator="k3", temperature=1.3, clip_eps=0.2,
                          num_epochs=2, num_mini_batches=1, micro_batch_rows=1, max_grad_norm=0.0, loss_impl="torch",
                          steps=1, lr=0.3, lr_schedule="constant")


def _worker(rank, world, port, dp, tp, ac):
    torch.set_num_threads(1)
    # the one-process reference on every group, before the process group exists (nothing is reduced)
    want_sums, want_grads, _ = grpo_step(build_model(TINY, seed=1), build_model(TINY, seed=2), GROUPS, CFG,
                                                 None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = parallel.build_mesh(world, dp, tp, "cpu")
        model = parallel.parallelize(build_model(TINY, seed=1), mesh, activation_checkpointing=ac, seq_len=CAPACITY)
        ref_model = parallel.parallelize(build_model(TINY, seed=2), mesh, seq_len=CAPACITY)
        dp_rank = parallel.dp_coords(mesh, rank, world)[0]
        # rollout phase: greedy answers (so the split over TP ranks cannot change them) of 3 prompts (an uneven
        # split), gathered in group order, equal the one-process generation on every rank
        prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
        want = generate(build_model(TINY, seed=1), prompts, num_samples=N, max_new_tokens=5, eos_token_id=-1,
                        greedy=True)
        group_prompts, outs = rollout(model, prompts, pick(RolloutParams, CFG, temperature=0.0, max_new_tokens=5),
                                      SimpleNamespace(eos_token_id=-1), torch.Generator().manual_seed(rank), mesh)
        assert group_prompts == [p for p in prompts for _ in range(N)]
        assert [o["tokens"] for o in outs] == [o["tokens"] for o in want]
        sums, grads, n_rows = grpo_step(model, ref_model, GROUPS[dp_rank::dp], CFG, mesh)
        if dp == 2:  # rank 0's answers pack into 4 rows, rank 1's into 2 (+2 padding rows)
            assert n_rows == 4
        checked = ["loss", "kl", "clipped", "tokens"] + (["entropy"] if tp == 1 else [])  # no entropy under TP
        idx = [GRPO_SUMS.index(k) for k in checked]
        torch.testing.assert_close(sums[idx], want_sums[idx], rtol=1e-5, atol=1e-5, msg=f"{checked}")
        assert want_sums[GRPO_SUMS.index("clipped")] > 0  # the second epoch clips some tokens
        assert len(grads) == len(want_grads) == CFG.num_epochs
        for step, (got, want) in enumerate(zip(grads, want_grads)):
            for name, g in got.items():
                err = (g - want[name]).norm() / want[name].norm().clamp(min=1e-12)
                assert err <= 1e-5, f"optimizer step {step}: gradient of {name} differs by {err:.2e} (relative)"
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dp,tp,ac", [(2, 1, False), (1, 2, False), (2, 2, True)], ids=["dp2", "tp2", "dp2xtp2"])
def test_grpo_step_on_a_mesh_equals_one_process(dp, tp, ac):
    torch.multiprocessing.spawn(_worker, args=(dp * tp, run.free_port(), dp, tp, ac), nprocs=dp * tp, join=True)


# ---- a torchrun RLVR run on 2 processes, killed and resumed ------------------------------------------------------


def write_fixture(tmp_path):
    model_dir = tmp_path / "tiny"
    build_model(TINY, seed=4).save_pretrained(str(model_dir))
    rows = tmp_path / "rl.jsonl"
    # 8 random bytes hold two runs of word characters (IFEval's word count) about half the time: rewards differ
    gt = json.dumps({"instruction_id_list": ["length_constraints:number_words"],
                     "kwargs": [{"num_words": 2, "relation": "at least"}]})
    with open(rows, "w") as f:
        for i in range(8):  # prompts of different lengths: ranks pack different row counts
            text = f"Say {i} in two words." + " Please, do it now and keep it short." * (i % 3)
            f.write(json.dumps({"messages": [{"role": "user", "content": text}], "ground_truth": gt,
                                "dataset": "ifeval"}) + "\n")
    return ["--model", str(model_dir), "--tokenizer", "byte", "--data", str(rows), "--num_samples", "4",
            "--prompts_per_step", "4", "--max_prompt_len", "128", "--max_new_tokens", "8", "--row_capacity", "272",
            "--lr", "1e-3", "--seed", "3", "--beta", "0.05", "--num_mini_batches", "2", "--steps", "3",
            "--save_every", "2", "--loss_impl", "torch"]


def torchrun_rlvr(args, check=True):
    env = dict(os.environ, NANOTULU_NO_BAR="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nanotulu.train_rlvr", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def test_torchrun_rlvr_killed_and_resumed_equals_uninterrupted(tmp_path):
    args = write_fixture(tmp_path)
    torchrun_rlvr(args + ["--output_dir", str(tmp_path / "a")])
    killed = torchrun_rlvr(args + ["--output_dir", str(tmp_path / "b"), "--exit_after_steps", "3"], check=False)
    assert killed.returncode != 0 and not os.path.exists(tmp_path / "b" / "final"), killed.stderr[-2000:]
    torchrun_rlvr(args + ["--output_dir", str(tmp_path / "b")])

    def metrics(d):
        with open(d / "metrics.jsonl") as f:
            return {r["step"]: r for r in map(json.loads, f)}  # the resumed step 3 replaces the lost one

    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert any(a[s]["grad_norm"] > 1e-3 and a[s]["kl"] > 0 for s in a)  # real updates, a KL term
    for step in a:
        for key in ("reward", "loss", "kl", "entropy", "response_len", "grad_norm", "clip_frac"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6 * max(1.0, abs(a[step][key])), (step, key)
