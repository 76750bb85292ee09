"""PPO with a value model, as Tulu 3 trained its RLVR stage (train_rlvr.py --algo ppo), and the PPO-clip policy
loss that GRPO uses too.

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

import dataclasses

import torch

from nanotulu import data, losses
from nanotulu.algos.rollout import (fill_old_and_ref_logps, mini_batches, pad_to_agreed_rows, rollout_rows,
                                     token_logps)
from nanotulu.packing import shift_labels
from nanotulu.parallel import (all_reduce_sum, clip_grad_norm, dp_group, grad_sync_on_last, precision, step_mean,
                               tp_group, trained_tokens)


@dataclasses.dataclass
class PPOParams:
    """PPO's hyperparameters (the learning rate and the update schedule: rollout.UpdateSchedule)."""
    clip_eps: float = 0.2
    beta: float = 0.05  # k1 KL to the reference as a per-token reward (0: none)
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    value_clip_eps: float = 0.2
    value_lr: float = 0.0  # the value model's learning rate (0: the policy's)
    loss_impl: str = "auto"
    micro_batch_rows: int = 1


def policy_loss(logp, old_logp, adv, clip_eps):
    """The PPO-clip policy loss per token (N,): max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp -
    old_logp), and whether the clip was active (GRPO's token loss adds its KL term to this)."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return loss, clipped


def value_loss(values, old_values, returns, clip_eps):
    """Per-token clipped value loss 0.5 max((V - R)^2, (V_clipped - R)^2) (N,) and whether the clipped branch won."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    plain, clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


# ----------------------------------------------------------------------------------------------------------------
# Rewards, GAE, whitening (float64, on the host)


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


def whiten(x, mask, group=None, device=None):
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of every rank of `group` (population variance),
    in float64; entries outside the mask are 0. x and mask live on the host; the three sums are all-reduced on
    `device` (the model's: NCCL reduces only CUDA tensors), then brought back."""
    m = mask.double()
    x = x.double() * m
    stats = torch.stack([x.sum(), (x * x).sum(), m.sum()])
    stats = all_reduce_sum(stats.to(device or stats.device), group).to(x.device)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = stats[1] / n - mean * mean
    return (x - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8) * m


def advantages_and_returns(batch_rows, beta, gamma, lam, group=None, device=None):
    """Fills each packed rollout row's "adv" (whitened over all rows and ranks) and "ret" from its "old_logp",
    "ref_logp" (optional), "old_value" and "final_reward" (the verifier reward, broadcast over the answer) entries,
    all (T,) aligned with the shifted targets. Runs on CPU in float64; the whitening's all-reduce on `device`."""
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
        whiten(torch.zeros(1), torch.zeros(1, dtype=torch.bool), group, device)
        return
    white = whiten(torch.cat(all_adv), torch.cat(all_mask), group, device).split([a.numel() for a in all_adv])
    for row, w in zip(batch_rows, white):
        row["adv"] = w.float()


# ----------------------------------------------------------------------------------------------------------------
# The value model beside the policy: rows, backward, update

PPO_SUMS = ("loss", "kl", "clipped", "entropy", "tokens", "value_loss", "value_clipped")  # ppo_backward's sums


@torch.no_grad()
def fill_values(value_model, rows, micro_batch_rows, device, use_bf16, tp_group):
    """Adds row["old_value"] (capacity,) = the value model's per-token values at rollout time."""
    value_model.eval()
    for i in range(0, len(rows), micro_batch_rows):
        chunk = rows[i:i + micro_batch_rows]
        b = data.stack_rows(chunk, device)
        with precision(value_model, use_bf16):
            v = value_model(b["input_ids"], b["position_ids"], b["cu_seqlens"], head=losses.score_head(tp_group),
                            max_seqlen=b.get("max_seqlen"))
        for r, x in zip(chunk, v.float().cpu().view(len(chunk), -1)):
            r["old_value"] = x
    value_model.train()


def ppo_rows(model, ref_model, value_model, group_prompts, outs, rew, hp, capacity, pad_id, device, use_bf16, mesh):
    """Every rollout packed into rows (padded to the agreed row count) with its old-policy log-probs, reference
    log-probs (with a KL term), values, then advantages (GAE, whitened over all ranks) and returns. hp: PPOParams."""
    tpg = tp_group(mesh)
    rows = rollout_rows(group_prompts, [o["tokens"] for o in outs], {"final_reward": rew.tolist()}, capacity, pad_id)
    rows = pad_to_agreed_rows(rows, capacity, pad_id, ("final_reward",), device)
    fill_old_and_ref_logps(model, ref_model, rows, hp, device, use_bf16, tpg)
    fill_values(value_model, rows, hp.micro_batch_rows, device, use_bf16, tpg)
    advantages_and_returns(rows, hp.beta, hp.gamma, hp.lam, dp_group(mesh), device)
    return rows


def ppo_backward(model, value_model, micro, hp, mesh=None, use_bf16=False):
    """Forward + backward of the policy and the value model over one mini-batch of packed rollout rows (stacked with
    adv / ret / old_logp / old_value per position): clipped policy loss and clipped value loss, each summed over the
    answer tokens and divided by the mini-batch's answer tokens over all ranks. Returns (sums of this rank named by
    PPO_SUMS; n_tokens)."""
    tpg = tp_group(mesh)
    device = micro[0]["input_ids"].device
    n_tokens, scale = step_mean(micro, trained_tokens, mesh)
    sums = torch.zeros(len(PPO_SUMS), device=device)
    # gradients reduced over the data-parallel ranks only in the last micro-batch's backward, for both models
    for m, _ in zip(grad_sync_on_last(model, micro), grad_sync_on_last(value_model, micro)):
        mask = (m["targets"].reshape(-1) != -100).float()

        def pg_loss(lp, s=0, e=None):  # clipped policy loss of tokens [s, e)
            return policy_loss(lp, m["old_logp"][s:e], m["adv"][s:e], hp.clip_eps)

        with precision(model, use_bf16):
            loss, logp, ent = token_logps(model, m, hp.temperature, hp.loss_impl, tpg, entropy=True,
                                          loss_fn=lambda lp, en, s, e: (pg_loss(lp, s, e)[0] * mask[s:e]).sum())
        (loss * scale).backward()
        with precision(value_model, use_bf16):
            values = value_model(m["input_ids"], m["position_ids"], m["cu_seqlens"], head=losses.score_head(tpg),
                                 max_seqlen=m.get("max_seqlen"))
        vf, v_clipped = value_loss(values.float(), m["old_value"], m["ret"], hp.value_clip_eps)
        v_loss = (vf * mask).sum()
        (v_loss * scale).backward()
        kl = m["old_logp"] - m["ref_logp"] if "ref_logp" in m else torch.zeros_like(mask)  # k1 of the rollout
        ent_sum = (ent * mask).sum() if ent is not None else torch.zeros((), device=device)
        sums += torch.stack([loss.detach(), (kl * mask).sum(), (pg_loss(logp)[1].float() * mask).sum(),
                             ent_sum, mask.sum(), v_loss.detach(), (v_clipped.float() * mask).sum()])
    return sums, n_tokens


def ppo_update(model, value_model, optimizer, rows, hp, sched, step, mesh, device, use_bf16):
    """num_epochs passes in num_mini_batches steps of the one optimizer over both models (policy in param group 0,
    value model in group 1, each clipped to max_grad_norm on its own). hp: PPOParams, sched:
    rollout.UpdateSchedule. -> (PPO_SUMS sums, last policy grad norm, last lr)."""
    names = ("adv", "ret", "old_logp", "old_value") + (("ref_logp",) if hp.beta > 0 else ())
    sums, grad_norm, lr = torch.zeros(len(PPO_SUMS), device=device), torch.zeros(()), sched.lr
    for lr, micro in mini_batches(rows, sched, step, device, names, hp.micro_batch_rows):
        sums += ppo_backward(model, value_model, micro, hp, mesh, use_bf16)[0]
        grad_norm = clip_grad_norm(model, sched.max_grad_norm)
        clip_grad_norm(value_model, sched.max_grad_norm)
        optimizer.param_groups[0]["lr"] = lr
        optimizer.param_groups[1]["lr"] = lr * (hp.value_lr or sched.lr) / sched.lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, lr
