"""GRPO: group-normalised advantages, the PPO-clip token loss (algos/ppo.policy_loss) plus beta x a KL estimate to
the reference, token-level normalisation over the mini-batch's answer tokens on all ranks.

Per token, r = exp(logp - logp_old), d = logp - logp_ref: loss = max(-A r, -A clip(r, 1 - eps, 1 + eps)) + beta x
KL estimate (k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d). Log-probs come from the fused head at the sampling
temperature: logits / T."""

import dataclasses

import torch

from nanotulu.algos.ppo import policy_loss
from nanotulu.algos.rollout import (fill_old_and_ref_logps, mini_batches, pad_to_agreed_rows, rollout_rows,
                                     token_logps)
from nanotulu.parallel import grad_sync_on_last, precision, step_mean, tp_group, trained_tokens
from nanotulu.run import optimizer_step

KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass
class GRPOParams:
    """GRPO's hyperparameters (the learning rate and the update schedule: rollout.UpdateSchedule)."""
    clip_eps: float = 0.2
    beta: float = 0.01  # KL coefficient (0: no reference model)
    kl_estimator: str = "k3"
    temperature: float = 1.0
    loss_impl: str = "auto"
    micro_batch_rows: int = 1


def group_advantages(rewards_, n):
    """rewards (G*n,) in group order -> (advantages (G*n,) float64, equal (G,) bool: groups with no reward spread).
    The std is the population std of the group (ddof 0). Computed in float64 whatever the input dtype, and a group
    whose rewards are all equal gets exactly 0: in float32 the mean of equal non-dyadic values (2/3 x 10, or x 0.1)
    can be one ulp off while the std is ~0, and (r - mean) / (std + 1e-8) would turn that ulp into about -48."""
    r = rewards_.double().view(-1, n)
    mean, std = r.mean(1, keepdim=True), r.std(1, unbiased=False, keepdim=True)
    equal = r.max(1).values == r.min(1).values  # (G,)
    adv = torch.where(equal[:, None], 0.0, (r - mean) / (std + 1e-8))
    return adv.view(-1), equal


# exp(-d) of k3 overflows fp32 below d = -88: beyond -K3_LIMIT it continues along its tangent (finite, same sign of
# gradient); for d >= -K3_LIMIT, value and gradient are exactly exp(-d)
K3_LIMIT = 20.0


def kl_estimate(logp, ref_logp, kind):
    """Per-token estimate of KL(pi || ref) from samples of pi, d = logp - ref_logp."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return d * d / 2
    if kind == "k3":
        dc = d.clamp(min=-K3_LIMIT)  # exp(-dc) <= e^20: finite in fp32 and bf16
        return torch.exp(-dc) * (1 + (dc - d)) - 1 + d  # = exp(-d) - 1 + d for d >= -K3_LIMIT
    raise ValueError(f"--kl_estimator {kind!r}: expected one of {', '.join(KL_ESTIMATORS)}")


def grpo_token_loss(logp, old_logp, ref_logp, adv, clip_eps, beta, kl_kind):
    """Per-token GRPO loss (N,) and its parts: PPO-clip policy term + beta x KL estimate. ref_logp None: no KL."""
    pg, clipped = policy_loss(logp, old_logp, adv, clip_eps)
    kl = torch.zeros_like(logp) if ref_logp is None else kl_estimate(logp, ref_logp, kl_kind)
    return pg + beta * kl, kl.detach(), clipped


def build_rows(model, ref_model, group_prompts, outs, adv, keep, hp, capacity, pad_id, device, use_bf16, tpg):
    """The kept rollouts packed into rows (padded to the row count agreed by all ranks) with their per-token
    advantage, old-policy log-prob and (with a KL term) reference log-prob. hp: GRPOParams."""
    rows = rollout_rows([group_prompts[i] for i in keep], [outs[i]["tokens"] for i in keep],
                        {"adv": adv[keep].tolist()}, capacity, pad_id)
    rows = pad_to_agreed_rows(rows, capacity, pad_id, ("adv",), device)
    fill_old_and_ref_logps(model, ref_model, rows, hp, device, use_bf16, tpg)
    return rows


GRPO_SUMS = ("loss", "kl", "clipped", "entropy", "tokens")  # what grpo_backward sums over trained tokens, in order


def grpo_backward(model, micro, hp, mesh=None, use_bf16=False):
    """Forward + backward of one mini-batch of packed rollout rows (each stacked with adv/old_logp/ref_logp per
    position). Token-level normalisation: the summed token loss divided by the mini-batch's answer tokens over all
    ranks, counted first. hp: GRPOParams. Returns (sums (5,) of this rank, named by GRPO_SUMS; n_tokens)."""
    device = micro[0]["input_ids"].device
    n_tokens, scale = step_mean(micro, trained_tokens, mesh)
    sums = torch.zeros(len(GRPO_SUMS), device=device)
    for m in grad_sync_on_last(model, micro):
        mask = (m["targets"].reshape(-1) != -100).float()
        ref = m["ref_logp"] if hp.beta > 0 else None

        def token_loss(lp, s=0, e=None):  # GRPO loss of tokens [s, e)
            return grpo_token_loss(lp, m["old_logp"][s:e], None if ref is None else ref[s:e], m["adv"][s:e],
                                   hp.clip_eps, hp.beta, hp.kl_estimator)

        with precision(model, use_bf16):
            loss, logp, ent = token_logps(model, m, hp.temperature, hp.loss_impl, tp_group(mesh), entropy=True,
                                          loss_fn=lambda lp, en, s, e: (token_loss(lp, s, e)[0] * mask[s:e]).sum())
        _, kl, clipped = token_loss(logp)
        (loss * scale).backward()
        ent_sum = (ent * mask).sum() if ent is not None else torch.zeros((), device=device)
        sums += torch.stack([loss.detach(), (kl * mask).sum(), (clipped.float() * mask).sum(), ent_sum, mask.sum()])
    return sums, n_tokens


def update(model, optimizer, rows, hp, sched, step, mesh, device, use_bf16):
    """num_epochs passes over the rollout rows in num_mini_batches optimizer steps each (fewer when there are fewer
    rows: every rank has the same row count, so all take the same steps). hp: GRPOParams, sched:
    rollout.UpdateSchedule. -> (GRPO_SUMS sums (5,) of this rank, last grad norm, last lr)."""
    names = ("adv", "old_logp") + (("ref_logp",) if hp.beta > 0 else ())
    sums, grad_norm, lr = torch.zeros(len(GRPO_SUMS), device=device), torch.zeros(()), sched.lr
    for lr, micro in mini_batches(rows, sched, step, device, names, hp.micro_batch_rows):
        sums += grpo_backward(model, micro, hp, mesh, use_bf16)[0]
        grad_norm = optimizer_step(model, optimizer, lr, sched.max_grad_norm)
    return sums, grad_norm, lr
