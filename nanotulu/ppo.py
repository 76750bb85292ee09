"""PPO with a value model, as Tulu 3 trained its RLVR stage (train_rlvr.py --algo ppo uses these pieces).

Per answer of L tokens, with d_t = log pi_old(a_t) - log ref(a_t) at each answer token t:
- rewards   r_t = -beta * d_t, plus the verifier's reward (x reward_scale) at the last token t = L;
- values    V_t = the value model's scalar at the position that predicts token t (the state before emitting it),
            V_{L+1} = 0 (the episode ends with the answer);
- GAE       delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1},  returns R_t = A_t + V_t;
- whitening A <- (A - mean(A)) / sqrt(var(A) + 1e-8) over every answer token of the rollout batch (all ranks);
- policy    max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) per token, rho = pi / pi_old;
- value     0.5 max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2) per token;
both averaged over the answer tokens of a mini-batch (all ranks), the value loss weighted by vf_coef.

Defaults (Tulu 3 8B RLVR, arXiv 2411.15124 table of PPO hyperparameters, and open-instruct's PPO script): gamma 1,
lambda 0.95, clip 0.2 (policy and value), beta 0.05 (k1 KL in the reward), 4 PPO epochs per rollout batch, lr 3e-7,
temperature 1, verifier reward 10, value model initialised from a general reward model.
"""

import torch


def answer_segments(targets, cu_seqlens):
    """Contiguous runs of trained positions, one per document: list of (start, end) flat positions (end exclusive)
    over B*T, in order. targets (B*T,) with -100 where nothing is trained (prompt, padding); each document's answer
    is one run, so a run never spans two documents."""
    trained = (targets != -100).cpu()
    bounds = cu_seqlens.cpu().tolist()
    runs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        idx = torch.nonzero(trained[s:e]).flatten()
        if idx.numel():
            runs.append((s + int(idx[0]), s + int(idx[-1]) + 1))
    return runs


def token_rewards(old_logp, ref_logp, final_reward, beta):
    """Per-token rewards of one answer (L,): -beta (old - ref) everywhere (k1 KL; ref None: none), plus the
    verifier reward at the last token."""
    r = torch.zeros_like(old_logp, dtype=torch.float64) if ref_logp is None else \
        -beta * (old_logp.double() - ref_logp.double())
    r[-1] += final_reward
    return r


def gae(rewards, values, gamma, lam):
    """Generalised advantage estimates of one answer, in float64: rewards (L,), values (L,) -> (advantages (L,),
    returns (L,)). The value after the last token is 0."""
    rewards, values = rewards.double(), values.double()
    adv = torch.zeros_like(rewards)
    last = 0.0
    for t in range(rewards.numel() - 1, -1, -1):
        next_value = values[t + 1] if t + 1 < values.numel() else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + values


def whiten(x, mask, group=None):
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of every rank of `group` (population variance),
    in float64; entries outside the mask are 0."""
    from nanotulu.common import all_reduce_sum

    m = mask.double()
    x = x.double() * m
    stats = all_reduce_sum(torch.stack([x.sum(), (x * x).sum(), m.sum()]), group)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = stats[1] / n - mean * mean
    return (x - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8) * m


def policy_loss(logp, old_logp, adv, clip_eps):
    """Per-token clipped policy loss (N,) and whether the clip was active."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return loss, clipped


def value_loss(values, old_values, returns, clip_eps):
    """Per-token clipped value loss 0.5 max((V - R)^2, (V_clipped - R)^2) (N,) and whether the clipped branch won."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    plain, clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


def advantages_and_returns(batch_rows, beta, gamma, lam, group=None):
    """Fills each packed rollout row's "adv" (whitened over all rows and ranks) and "ret" from its "old_logp",
    "ref_logp" (optional), "old_value" and "final_reward" (the verifier reward, broadcast over the answer) entries,
    all (T,) aligned with the shifted targets. Runs on CPU in float64."""
    from nanotulu.packing import shift_labels

    all_adv, all_mask = [], []
    for row in batch_rows:
        targets = shift_labels(row["labels"], row["cu_seqlens"])
        adv = torch.zeros(targets.numel(), dtype=torch.float64)
        ret = torch.zeros_like(adv)
        for s, e in answer_segments(targets, row["cu_seqlens"]):
            ref = row["ref_logp"][s:e] if "ref_logp" in row else None
            r = token_rewards(row["old_logp"][s:e], ref, float(row["final_reward"][s]), beta)
            adv[s:e], ret[s:e] = gae(r, row["old_value"][s:e], gamma, lam)
        row["ret"] = ret.float()
        all_adv.append(adv)
        all_mask.append(targets != -100)
    if not batch_rows:  # still join the whitening all-reduce of the other ranks
        whiten(torch.zeros(1), torch.zeros(1, dtype=torch.bool), group)
        return
    white = whiten(torch.cat(all_adv), torch.cat(all_mask), group).split([a.numel() for a in all_adv])
    for row, w in zip(batch_rows, white):
        row["adv"] = w.float()
