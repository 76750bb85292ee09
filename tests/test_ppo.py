"""PPO pieces against their formulas: GAE (closed form), whitening (numpy), the clipped policy and value losses
(values and central-difference gradients), and the packed-row advantages against one answer at a time."""

import numpy as np
import pytest
import torch

from nanotulu import data
from nanotulu.algos.ppo import (advantages_and_returns, answer_segments, gae, policy_loss, token_rewards, value_loss,
                          whiten)


def test_gae_matches_closed_form():
    torch.manual_seed(0)
    for L, gamma, lam in ((1, 1.0, 0.95), (7, 1.0, 0.95), (12, 0.9, 0.8)):
        r, v = torch.randn(L, dtype=torch.float64), torch.randn(L, dtype=torch.float64)
        adv, ret = gae(r, v, gamma, lam)
        vals = v.tolist() + [0.0]
        delta = [r[t].item() + gamma * vals[t + 1] - vals[t] for t in range(L)]
        for t in range(L):
            want = sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, L))
            assert abs(adv[t].item() - want) < 1e-12
            assert abs(ret[t].item() - (want + vals[t])) < 1e-12
    # gamma = lambda = 1: every advantage is the remaining reward minus the value
    r, v = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    adv, _ = gae(r, v, 1.0, 1.0)
    torch.testing.assert_close(adv, r.flip(0).cumsum(0).flip(0) - v)


def test_token_rewards_kl_and_final_reward():
    old, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    r = token_rewards(old, ref, 10.0, beta=0.05)
    torch.testing.assert_close(r, torch.tensor([-0.025, 0.05, 10.0], dtype=torch.float64))
    torch.testing.assert_close(token_rewards(old, None, 1.0, 0.05), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_whiten_matches_numpy():
    torch.manual_seed(1)
    x, mask = torch.randn(20) * 3 + 2, torch.rand(20) > 0.3
    got = whiten(x, mask)
    sel = x[mask].double().numpy()
    want = (sel - sel.mean()) / np.sqrt(sel.var() + 1e-8)
    np.testing.assert_allclose(got[mask].numpy(), want, rtol=1e-12)
    assert (got[~mask] == 0).all()


def pg_formula(lp, old, a, eps):
    rho = np.exp(lp - old)
    return max(-a * rho, -a * min(max(rho, 1 - eps), 1 + eps))


def vf_formula(v, v_old, ret, eps):
    vc = v_old + min(max(v - v_old, -eps), eps)
    return 0.5 * max((v - ret) ** 2, (vc - ret) ** 2)


def central(f, x, h=1e-6):
    return (f(x + h) - f(x - h)) / (2 * h)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_losses_values_and_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    n, eps = 40, 0.2
    lp = (-torch.rand(n, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = lp.detach() + torch.randn(n, generator=g, dtype=torch.float64) * 0.4  # ratios on both sides of the clip
    a = torch.randn(n, generator=g, dtype=torch.float64)
    pg, _ = policy_loss(lp, old, a, eps)
    pg.sum().backward()
    v = torch.randn(n, generator=g, dtype=torch.float64).requires_grad_()
    v_old = v.detach() + torch.randn(n, generator=g, dtype=torch.float64) * 0.4
    ret = torch.randn(n, generator=g, dtype=torch.float64)
    vf, _ = value_loss(v, v_old, ret, eps)
    vf.sum().backward()
    for i in range(n):
        x, o, ai = lp[i].item(), old[i].item(), a[i].item()
        assert abs(pg[i].item() - pg_formula(x, o, ai, eps)) < 1e-12
        assert abs(lp.grad[i].item() - central(lambda y: pg_formula(y, o, ai, eps), x)) < 1e-6
        y, yo, ri = v[i].item(), v_old[i].item(), ret[i].item()
        assert abs(vf[i].item() - vf_formula(y, yo, ri, eps)) < 1e-12
        assert abs(v.grad[i].item() - central(lambda z: vf_formula(z, yo, ri, eps), y)) < 1e-6


def test_packed_advantages_equal_one_answer_at_a_time():
    """advantages_and_returns over packed rows == GAE per answer, then one whitening over all answer tokens."""
    torch.manual_seed(3)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 1]]
    answers = [[10, 11, 12, 2], [13, 2], [14, 15, 16, 17, 2], [18, 2]]
    finals = [10.0, 0.0, 10.0, 3.3]
    docs = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(prompts, answers)]
    rows = [data.make_row(docs[:2], 16, 0), data.make_row(docs[2:], 16, 0)]
    per_answer = []
    for row, k in zip(rows, (0, 2)):
        for name in ("old_logp", "ref_logp", "old_value"):
            row[name] = torch.randn(16)
        row["final_reward"] = torch.zeros(16)
        targets = data.shift_labels(row["labels"], row["cu_seqlens"])
        segs = answer_segments(targets, row["cu_seqlens"])
        assert [e - s for s, e in segs] == [len(answers[k]), len(answers[k + 1])]
        for j, (s, e) in enumerate(segs):
            row["final_reward"][s:e] = finals[k + j]
            r = token_rewards(row["old_logp"][s:e], row["ref_logp"][s:e], finals[k + j], 0.05)
            per_answer.append(gae(r, row["old_value"][s:e], 1.0, 0.95))
    advantages_and_returns(rows, beta=0.05, gamma=1.0, lam=0.95)
    all_adv = torch.cat([a for a, _ in per_answer])
    white = (all_adv - all_adv.mean()) / torch.sqrt(all_adv.var(unbiased=False) + 1e-8)
    got_adv, got_ret = [], []
    for row in rows:
        targets = data.shift_labels(row["labels"], row["cu_seqlens"])
        got_adv.append(row["adv"][targets != -100])
        got_ret.append(row["ret"][targets != -100])
        assert (row["adv"][targets == -100] == 0).all()
    torch.testing.assert_close(torch.cat(got_adv).double(), white, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(got_ret).double(), torch.cat([r for _, r in per_answer]), rtol=1e-6,
                               atol=1e-6)
