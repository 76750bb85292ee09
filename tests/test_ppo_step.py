"""PPO in the RLVR trainer: rollout rows (old log-probs, values, GAE) and one PPO update of policy and value model
against a plain-torch reference from full logits, one sequence at a time; the same step on 2 gloo ranks against
one process; a killed PPO run resumed equals the uninterrupted one."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from nanotulu import data, parallel, run
from nanotulu.model import Llama, LlamaConfig, build_model
from nanotulu.algos import ppo
from nanotulu.algos.ppo import PPO_SUMS, PPOParams, ppo_backward, ppo_rows, ppo_update
from nanotulu.algos.rollout import UpdateSchedule
from nanotulu.flags import pick


@dataclasses.dataclass
class RLParams(PPOParams, UpdateSchedule):
    """This test's PPO settings in one place; each call takes its algorithm's dataclass of them (pick)."""

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True)
CAPACITY = 128
CFG = dataclasses.replace(RLParams(), beta=0.05, temperature=1.3, clip_eps=0.2,
                          value_clip_eps=0.2, gamma=1.0, lam=0.95, num_epochs=2, num_mini_batches=1,
                          micro_batch_rows=1, max_grad_norm=0.0, loss_impl="torch", steps=1, lr=0.3,
                          lr_schedule="constant")
ANSWERS = [("What is 12 + 30?", "It is 42.", 10.0), ("Hi?", "hello there", 0.0),
           ("Write one short sentence in lowercase.", "the cat sat on the mat.", 10.0), ("Count.", "1 2 3", 6.67)]


def models(tmp_path=None, seed=1):
    """Policy, reference and a value model (the policy's weights with a drawn score head)."""
    policy, ref = build_model(TINY, seed=seed), build_model(TINY, seed=seed + 1)
    value = Llama(TINY, score_head=True)
    value.load_state_dict({**policy.state_dict(), "score.weight": torch.randn(1, TINY.hidden_size,
                                                                             generator=torch.Generator().manual_seed(5))})
    return policy, ref, value


def rollouts(tok, answers):
    prompts = [tok.encode(f"<|user|>\n{p}\n<|assistant|>\n") for p, _, _ in answers]
    outs = [{"tokens": tok.encode(a) + [tok.eos_token_id]} for _, a, _ in answers]
    return prompts, outs, torch.tensor([r for _, _, r in answers], dtype=torch.float64)


def seq_logps_values(policy, value, ids, T):
    """Full-logits log-probs of each next token at temperature T and the value at each position, float64."""
    lp = torch.log_softmax(policy.logits(ids[None])[0, :-1].double() / T, -1).gather(1, ids[1:, None])[:, 0]
    return lp, value.logits(ids[None])[0, :-1, 0].double()


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_ppo_rows_and_step_equal_plain_torch(impl):
    cfg = dataclasses.replace(CFG, loss_impl=impl, num_epochs=1)
    tok = data.load_tokenizer("byte")
    policy, ref, value = models()
    prompts, outs, rew = rollouts(tok, ANSWERS)
    rows = ppo_rows(policy, ref, value, prompts, outs, rew, pick(PPOParams, cfg), CAPACITY, tok.pad_token_id,
                    torch.device("cpu"),
                    False, None)
    micro = data.micro_batches(rows, 1, "cpu", per_position=("adv", "ret", "old_logp", "old_value", "ref_logp"))
    sums, n_tok = ppo_backward(policy, value, micro, pick(PPOParams, cfg))
    got = {("p", n): p.grad.clone() for n, p in policy.named_parameters()}
    got.update({("v", n): p.grad.clone() for n, p in value.named_parameters()})
    policy.zero_grad(), value.zero_grad()

    # plain reference: each answer alone, float64 full logits, rewards / GAE / whitening / losses by formula
    per = []
    with torch.no_grad():
        for p, o, r in zip(prompts, outs, rew.tolist()):
            ids = torch.tensor(p + o["tokens"])
            lp, v = seq_logps_values(policy, value, ids, cfg.temperature)
            ref_lp, _ = seq_logps_values(ref, value, ids, cfg.temperature)
            a = slice(len(p) - 1, len(ids) - 1)  # positions predicting the answer tokens
            rewards = ppo.token_rewards(lp[a], ref_lp[a], r, cfg.beta)
            adv, ret = ppo.gae(rewards, v[a], cfg.gamma, cfg.lam)
            per.append((ids, a, lp[a], v[a], adv, ret))
    all_adv = torch.cat([x[4] for x in per])
    white = ((all_adv - all_adv.mean()) / torch.sqrt(all_adv.var(unbiased=False) + 1e-8)).split(
        [x[4].numel() for x in per])
    total = 0.0
    policy64, value64 = policy.double(), value.double()
    for (ids, a, old_lp, old_v, _, ret), adv in zip(per, white):
        lp, v = seq_logps_values(policy64, value64, ids, cfg.temperature)
        pg, _ = ppo.policy_loss(lp[a], old_lp, adv, cfg.clip_eps)
        vf, _ = ppo.value_loss(v[a], old_v, ret, cfg.value_clip_eps)
        total = total + pg.sum() + vf.sum()
    n = sum(x[4].numel() for x in per)
    (total / n).backward()
    assert n_tok.item() == n
    ref_loss = dict(zip(PPO_SUMS, sums))
    # at the first update the policy is the old policy: ratio 1, the loss is -mean(A) = 0 after whitening
    assert abs(ref_loss["loss"].item() / n) < 1e-5
    for (kind, name), g in got.items():
        want = (policy64 if kind == "p" else value64).get_parameter(name).grad
        err = (g.double() - want).norm() / want.norm().clamp(min=1e-12)
        assert err <= 1e-5, f"{kind} {name}: gradient differs by {err:.2e} (relative)"


def ppo_step(policy, ref, value, answers, cfg, mesh):
    """One PPO rollout batch on fixed answers: rows, advantages, the update (SGD: linear in the gradient).
    -> (PPO_SUMS summed over dp ranks, each parameter's change (full tensors), policy's then the value model's)."""
    opt = torch.optim.SGD([{"params": policy.parameters()}, {"params": value.parameters()}], lr=0.3)
    tok = data.load_tokenizer("byte")
    prompts, outs, rew = rollouts(tok, answers)
    device = torch.device("cpu")

    def full():
        return {f"{tag}.{n}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for tag, m in (("policy", policy), ("value", value)) for n, p in m.named_parameters()}

    before = full()
    hp = pick(PPOParams, cfg)
    rows = ppo_rows(policy, ref, value, prompts, outs, rew, hp, CAPACITY, tok.pad_token_id, device, False, mesh)
    sums, _, _ = ppo_update(policy, value, opt, rows, hp, pick(UpdateSchedule, cfg), 0, mesh, device, False)
    return parallel.all_reduce_sum(sums, parallel.dp_group(mesh)), {n: p - before[n] for n, p in full().items()}


def _worker(rank, world, port):
    torch.set_num_threads(1)
    want_sums, want = ppo_step(*models(), ANSWERS, CFG, None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = parallel.build_mesh(world, world, 1, "cpu")
        policy, ref, value = (parallel.parallelize(m, mesh, seq_len=CAPACITY) for m in models())
        sums, got = ppo_step(policy, ref, value, ANSWERS[rank::world], CFG, mesh)
        idx = [PPO_SUMS.index(k) for k in ("loss", "kl", "clipped", "tokens", "value_loss", "value_clipped")]
        torch.testing.assert_close(sums[idx], want_sums[idx], rtol=1e-5, atol=1e-5)
        assert want_sums[PPO_SUMS.index("clipped")] > 0  # the second epoch clips some tokens
        for name, delta in got.items():  # two SGD steps: the changes are sums of lr x gradients
            err = (delta - want[name]).norm() / want[name].norm().clamp(min=1e-12)
            assert err <= 1e-5, f"{name} changed differently by {err:.2e} (relative)"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ppo_step_on_two_ranks_equals_one_process():
    torch.multiprocessing.spawn(_worker, args=(2, run.free_port()), nprocs=2, join=True)


def test_killed_ppo_run_resumes_to_the_same_metrics(tmp_path):
    model_dir = tmp_path / "tiny"
    build_model(TINY, seed=4).save_pretrained(str(model_dir))
    rows = tmp_path / "rl.jsonl"
    gt = json.dumps({"instruction_id_list": ["length_constraints:number_words"],
                     "kwargs": [{"num_words": 2, "relation": "at least"}]})
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i} in two words."}],
                                        "ground_truth": gt, "dataset": "ifeval"}) + "\n" for i in range(8)))
    args = ["-m", "nanotulu.train_rlvr", "--algo", "ppo", "--model", str(model_dir), "--tokenizer", "byte",
            "--data", str(rows), "--num_samples", "2", "--prompts_per_step", "2", "--max_prompt_len", "48",
            "--max_new_tokens", "8", "--lr", "1e-3", "--num_epochs", "2", "--seed", "3", "--steps", "3",
            "--save_every", "2", "--loss_impl", "torch"]
    env = dict(os.environ, NANOTULU_NO_BAR="1")

    def run(out, *extra, check=True):
        return subprocess.run([sys.executable, *args, "--output_dir", str(out), *extra], env=env, capture_output=True,
                              text=True, check=check, timeout=300)

    run(tmp_path / "a")
    assert run(tmp_path / "b", "--exit_after_steps", "3", check=False).returncode == 3
    run(tmp_path / "b")

    def metrics(d):
        with open(d / "metrics.jsonl") as f:
            return {r["step"]: r for r in map(json.loads, f)}

    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert sorted(a) == [1, 2, 3] and os.path.isfile(tmp_path / "a" / "final_value" / "config.json")
    assert any(a[s]["grad_norm"] > 1e-3 for s in a) and all(a[s]["value_loss"] > 0 for s in a)
    for step in a:
        for key in ("reward", "loss", "kl", "value_loss", "response_len", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6 * max(1.0, abs(a[step][key])), (step, key)
