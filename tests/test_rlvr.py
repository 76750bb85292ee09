"""GRPO: advantages and the clipped loss against plain formulas (values and gradients), and one GRPO step through
the fused kernel against a plain-torch reference from full logits."""

import math

import pytest
import torch

from nanotulu import data
from nanotulu.model import LlamaConfig, build_model
from nanotulu.data import stack_rows as stack
from nanotulu.algos.grpo import (K3_LIMIT, GRPOParams, group_advantages, grpo_backward, grpo_token_loss,
                                 kl_estimate)
from nanotulu.algos.rollout import PromptSampler, rollout_rows

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)


def test_group_advantages_match_formula():
    torch.manual_seed(0)
    n, G = 4, 5
    r = torch.randint(0, 3, (G * n,)).double() * 10
    r[8:12] = 10.0  # one group with equal rewards
    adv, equal = group_advantages(r, n)
    for g in range(G):
        xs = r[g * n:(g + 1) * n].tolist()
        mean = sum(xs) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
        for i, x in enumerate(xs):
            assert abs(adv[g * n + i].item() - (x - mean) / (std + 1e-8)) < 1e-9
        assert bool(equal[g]) == (max(xs) == min(xs))
    assert bool(equal[2]) and (adv[8:12] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_equal_groups_get_exactly_zero_advantage(dtype):
    """Non-dyadic equal rewards (an IFEval fraction 2/3 x 10, a reward scale of 0.1): in float32 the group mean is
    an ulp off and (r - mean) / (std + 1e-8) was about -48; every dtype must give exactly 0 for such a group, and
    the other groups the float64 formula."""
    n = 3
    values = [2 / 3 * 10, 0.1 * 3, 0.7, 1 / 3 * 0.1, 2 / 3 * 10, 0.0, 0.1 * 3]
    r = torch.tensor([v for v in values for _ in range(n)] + [0.1, 0.2, 0.7], dtype=dtype)
    adv, equal = group_advantages(r, n)
    assert adv.dtype == torch.float64 and equal.tolist() == [True] * len(values) + [False]
    assert (adv[:-n] == 0).all(), adv[:-n]
    last = r[-n:].double()
    want = (last - last.mean()) / (last.std(unbiased=False) + 1e-8)
    torch.testing.assert_close(adv[-n:].double(), want, rtol=1e-6, atol=1e-6)
    # the float32 formula this replaces really is wrong for such a group (the test could fail)
    r32 = torch.tensor([2 / 3] * 3, dtype=torch.float32) * 10
    assert ((r32 - r32.mean()) / (r32.std(unbiased=False) + 1e-8)).abs().max() > 0.5


def test_k3_is_finite_for_any_log_ratio_and_exact_in_range():
    d64 = torch.cat([torch.linspace(-K3_LIMIT, 30, 201, dtype=torch.float64), torch.tensor([-100.0, 100.0, -1e4])])
    for dtype in (torch.float32, torch.bfloat16):
        lp = d64.to(dtype).requires_grad_()
        kl = kl_estimate(lp, torch.zeros_like(lp), "k3")
        (g,) = torch.autograd.grad(kl.sum(), lp)
        assert torch.isfinite(kl).all() and torch.isfinite(g).all(), dtype
        d = lp.detach().double()
        inside = d >= -K3_LIMIT
        want, dwant = torch.exp(-d) - 1 + d, 1 - torch.exp(-d)  # the float64 formula and its derivative
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(kl.double()[inside], want[inside], rtol=tol, atol=tol)
        torch.testing.assert_close(g.double()[inside], dwant[inside], rtol=tol, atol=tol)
        # below the limit: the tangent at -K3_LIMIT (huge, finite, still pulling logp up towards the reference)
        assert (kl.double()[~inside] >= want[inside].max() * (1 - tol)).all() and (g[~inside] < -1e8).all()


def plain_token_loss(lp, old, ref, a, eps, beta, kind):
    """One token, Python floats: the PPO-clip objective + beta * KL estimate, and d loss / d lp."""
    ratio = math.exp(lp - old)
    unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
    pg = max(unclipped, clipped)
    d_pg = -a * ratio if unclipped >= clipped else 0.0  # the clipped branch is flat in lp
    d = lp - ref
    kl = {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[kind]
    d_kl = {"k1": 1.0, "k2": d, "k3": 1 - math.exp(-d)}[kind]
    return pg + beta * kl, d_pg + beta * d_kl


def test_grpo_token_loss_values_and_grads():
    torch.manual_seed(1)
    N = 64
    lp = (-torch.rand(N, dtype=torch.float64) * 3).requires_grad_()
    old = lp.detach() + torch.randn(N, dtype=torch.float64) * 0.3  # ratios spread across both clip edges
    ref = lp.detach() + torch.randn(N, dtype=torch.float64) * 0.5
    adv = torch.randn(N, dtype=torch.float64)
    for kind in ("k1", "k2", "k3"):
        loss, kl, clipped = grpo_token_loss(lp, old, ref, adv, 0.2, 0.05, kind)
        (g,) = torch.autograd.grad(loss.sum(), lp)
        for i in range(N):
            want, dwant = plain_token_loss(lp[i].item(), old[i].item(), ref[i].item(), adv[i].item(), 0.2, 0.05, kind)
            assert abs(loss[i].item() - want) < 1e-12 and abs(g[i].item() - dwant) < 1e-12, (kind, i)
        assert clipped.any() and (~clipped).any()
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), torch.exp(ref - lp) - 1 + (lp - ref))


@pytest.mark.parametrize("impl,kl", [("triton", "k3"), ("auto", "k3"), ("auto", "k1"), ("fused", "k2")])
def test_grpo_step_fused_kernel_equals_plain_torch(impl, kl):
    torch.manual_seed(2)
    tok = data.load_tokenizer("byte")
    model = build_model(TINY, seed=3)
    prompts = [tok.encode(f"<|user|>\nWhat is {i} + 1?\n<|assistant|>\n") for i in range(4)]
    responses = [tok.encode(f"It is {i + 1}.") + [tok.eos_token_id] for i in range(4)]
    adv = [1.0, -0.5, 0.3, -0.8]
    rows = rollout_rows(prompts, responses, {"adv": adv}, 384, tok.pad_token_id)
    T = 1.3  # sampling temperature: log-probs of logits / T
    # old and reference log-probs: fixed random perturbations of the current ones, so ratios and KL are non-trivial
    for r in rows:
        r["old_logp"] = -torch.rand(384) * 4
        r["ref_logp"] = -torch.rand(384) * 4

    micro = [stack([r], "cpu", ("adv", "old_logp", "ref_logp")) for r in rows]
    sums, n_tok = grpo_backward(model, micro, GRPOParams(temperature=T, clip_eps=0.2, beta=0.05,
                                                                 kl_estimator=kl, loss_impl=impl))
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # plain reference: each sequence alone, full logits / T, log_softmax, per-token loss by formula
    total, count = 0.0, 0
    for r in rows:
        cu = r["cu_seqlens"].tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            labels = r["labels"][s:e]
            if (labels == -100).all():
                continue  # padding tail
            logits = model.logits(r["input_ids"][None, s:e])[0].double() / T  # (L, V)
            logp_all = torch.log_softmax(logits[:-1], -1)
            tgt = labels[1:]
            mask = tgt != -100
            lp = logp_all[mask].gather(1, tgt[mask][:, None])[:, 0]
            pos = torch.arange(s, e - 1)[mask]
            loss, _, _ = grpo_token_loss(lp, r["old_logp"][pos].double(), r["ref_logp"][pos].double(),
                                         r["adv"][pos].double(), 0.2, 0.05, kl)
            total = total + loss.sum()
            count += int(mask.sum())
    (total / count).backward()
    assert int(n_tok) == count
    assert abs(sums[0].item() / count - (total / count).item()) < 1e-5
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad.float(), rtol=1e-4, atol=1e-6, msg=n)


def test_prompt_sampler_splits_ranks_and_resumes():
    a = PromptSampler(10, 4, 0, 2, seed=5)
    b = PromptSampler(10, 4, 1, 2, seed=5)
    for _ in range(5):
        x, y = a.next(), b.next()
        assert len(x) == len(y) == 2 and not set(x) & set(y)
    state = a.state_dict()
    want = [a.next() for _ in range(3)]
    c = PromptSampler(10, 4, 0, 2, seed=5)
    c.load_state_dict(state)
    assert [c.next() for _ in range(3)] == want


# ---------------------------------------------------------------------------------------------------------------
# The trainer end to end on a tiny model: resume and bad input

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402



def tiny_run_args(tmp_path):
    model_dir = tmp_path / "tiny"
    if not model_dir.exists():
        build_model(TINY, seed=4).save_pretrained(str(model_dir))
    rows = tmp_path / "rl.jsonl"
    with open(rows, "w") as f:
        for i in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"}],
                                "ground_truth": str(i + 1), "dataset": "gsm8k"}) + "\n")
            # 8 random bytes hold at least two runs of word characters (IFEval's word count) about half the time:
            # rewards that differ within a group (lowercase no longer does: IFEval also asks langdetect for English)
            gt = {"instruction_id_list": ["length_constraints:number_words"],
                  "kwargs": [{"num_words": 2, "relation": "at least"}]}
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i} in two words."}],
                                "ground_truth": json.dumps(gt), "dataset": "ifeval"}) + "\n")
    return ["--model", str(model_dir), "--tokenizer", "byte", "--data", str(rows), "--num_samples", "2",
            "--prompts_per_step", "2", "--max_prompt_len", "48", "--max_new_tokens", "8", "--lr", "1e-3",
            "--seed", "3", "--num_mini_batches", "2"]


def run_rlvr(args, check=True):
    env = dict(os.environ, NANOTULU_NO_BAR="1")
    return subprocess.run([sys.executable, "-m", "nanotulu.train_rlvr", *args], env=env, capture_output=True,
                          text=True, check=check, timeout=300)


def test_killed_rlvr_run_resumes_to_the_same_metrics(tmp_path):
    args = tiny_run_args(tmp_path) + ["--steps", "4", "--save_every", "2"]
    run_rlvr(args + ["--output_dir", str(tmp_path / "a")])
    killed = run_rlvr(args + ["--output_dir", str(tmp_path / "b"), "--exit_after_steps", "3"], check=False)
    assert killed.returncode == 3, killed.stderr[-2000:]
    run_rlvr(args + ["--output_dir", str(tmp_path / "b")])

    def metrics(d):
        with open(d / "metrics.jsonl") as f:
            return {r["step"]: r for r in map(json.loads, f)}

    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert sorted(a) == [1, 2, 3, 4]
    assert any(a[s]["grad_norm"] > 1e-3 for s in a)  # real updates happened (rewards differed in a group)
    for step in a:  # rollouts, rewards and updates replay exactly (timings aside)
        for key in ("reward", "loss", "kl", "entropy", "response_len", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6 * max(1.0, abs(a[step][key])), (step, key)


def test_rlvr_bad_input(tmp_path, capsys):
    from nanotulu.train_rlvr import main

    args = tiny_run_args(tmp_path)
    with pytest.raises(ValueError, match=r"rl.jsonl:\d+: prompt longer than --max_prompt_len 4"):
        main(args + ["--max_prompt_len", "4", "--output_dir", str(tmp_path / "x")])
    other = tmp_path / "other"
    build_model(LlamaConfig(**{**TINY.__dict__, "intermediate_size": 96}), seed=0).save_pretrained(str(other))
    with pytest.raises(ValueError, match="ref_model.*shape differs"):
        main(args + ["--ref_model", str(other), "--output_dir", str(tmp_path / "y")])
    # an untrained model fails every answer: training goes on, with a warning that there is no signal
    args[args.index("--data") + 1] = str(tmp_path / "gsm8k_only.jsonl")
    with open(tmp_path / "rl.jsonl") as src, open(tmp_path / "gsm8k_only.jsonl", "w") as dst:
        dst.writelines(line for line in src if '"gsm8k"' in line)
    main(args + ["--steps", "1", "--output_dir", str(tmp_path / "z")], finish=False)
    assert "every answer of the first rollout batch failed verification" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (compiled, CUDA-graph decode step)")
def test_rollout_compiled_cuda_graph_equals_eager_on_gpu():
    """RLVR's rollout on CUDA uses the compiled decode step replayed from a CUDA graph, with one cache length
    (max_prompt_len + max_new_tokens) for every step: same samples as the eager step, two steps in a row."""
    import dataclasses
    from types import SimpleNamespace

    from nanotulu.algos.rollout import RolloutParams, rollout

    model = build_model(TINY, device="cuda", seed=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    tok = SimpleNamespace(eos_token_id=-1)
    cfg = RolloutParams(num_samples=4, max_prompt_len=16, max_new_tokens=12, temperature=1.0)
    for step in range(2):
        got = rollout(model, prompts, cfg, tok, torch.Generator(device="cuda").manual_seed(step), None)[1]
        eager = rollout(model, prompts, dataclasses.replace(cfg, compiled_decode=False), tok,
                        torch.Generator(device="cuda").manual_seed(step), None)[1]
        assert [o["tokens"] for o in got] == [o["tokens"] for o in eager]
