"""Reinforcement learning with verifiable rewards (Tulu 3 stage 3) by GRPO, run with torchrun or plain python.

    torchrun --nproc_per_node 1 nanotulu/train_rlvr.py       # embedded default: after SFT (and DPO), on CPU
    torchrun --nproc_per_node 8 nanotulu/train_rlvr.py --model runs/dpo-8b/final --data rlvr_gsm8k.jsonl \
        --output_dir runs/rlvr-8b

One step:
1. rollouts: each data-parallel rank takes its share of `prompts_per_step` prompts and samples `num_samples`
   answers to each with the policy itself (nanotulu.generate: static KV cache, each prompt prefilled once for its
   group, on CUDA a compiled CUDA-graph decode step; FSDP / TP weights gathered once, no second copy kept); the
   ranks of a tensor-parallel group split the prompts and exchange the answers;
2. rewards: the verifiers (nanotulu.rewards) score each answer, x reward_scale; answers cut off by the length
   limit can get a non-stop penalty instead;
3. advantages: per prompt group, (r - mean) / (std + 1e-8); groups whose rewards are all equal carry no signal and
   are counted (and dropped with --drop_equal_groups);
4. the old policy's and the frozen reference's per-token log-probs in no-grad passes over packed rows, padded to
   the row count of the rank with the most rows (every rank runs the same forwards and backwards);
5. `num_epochs` passes over the rollouts in `num_mini_batches` optimizer steps each: PPO-clip per-token loss
   max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r = exp(logp - logp_old), plus beta x a KL estimate to the
   reference (k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d with d = logp - logp_ref), summed over the answer tokens
   and divided by the number of answer tokens of the mini-batch over all ranks (token-level normalisation).
Log-probs come from the fused kernel (linear_logprobs) at the sampling temperature: logits / T.
"""

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from nanotulu import checkpoint, common, data, embedded, lora, losses, ppo, rewards
from nanotulu.data import TEMPLATE_HELP_OWN
from nanotulu.generate import gathered, generate

KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class RLVRConfig(lora.LoRAFlags, common.RunFlags):  # LoRA: its flags
    """GRPO with verifiable rewards. Defaults are open-instruct's GRPO recipe for Tulu 3.1 8B; with no --model the
    embedded model (after the embedded SFT/DPO) and the shipped verifiable tasks are used with a preset."""
    model: str = field(default="", metadata={"help": "HF directory of the starting policy; empty: embedded"})
    ref_model: str = field(default="", metadata={"help": "frozen reference for the KL term; empty: --model"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer directory or 'byte'; empty: the model's"})
    data: str = field(default="", metadata={"help": "mix 'file[:amount],...' of RLVR rows (amount: 0.5 = fraction, "
                                                    "500 = rows)"})
    eval_data: str = field(default="", metadata={"help": "held-out RLVR rows for accuracy, a mix as --data"})
    template: str = field(default="", metadata={"help": TEMPLATE_HELP_OWN})
    output_dir: str = "runs/rlvr"
    num_samples: int = field(default=16, metadata={"help": "answers sampled per prompt (the GRPO group)"})
    prompts_per_step: int = field(default=48, metadata={"help": "prompts per rollout batch, all ranks"})
    max_prompt_len: int = 2048
    max_new_tokens: int = 2048
    temperature: float = 1.0
    lr: float = 5e-7
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    beta: float = field(default=0.01, metadata={"help": "KL coefficient (0: no reference model at all)"})
    kl_estimator: str = field(default="k3", metadata={"help": "k1 | k2 | k3"})
    clip_eps: float = 0.2
    num_epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    num_mini_batches: int = field(default=1, metadata={"help": "optimizer steps per pass"})
    reward_scale: float = 10.0
    nonstop_penalty: float = field(default=float("nan"), metadata={"help": "reward of a cut-off answer (nan: off)"})
    drop_equal_groups: bool = field(default=False, metadata={"help": "drop groups whose rewards are all equal"})
    steps: int = 100
    row_capacity: int = field(default=0, metadata={"help": "packed row length (0: max_prompt_len+max_new_tokens)"})
    micro_batch_rows: int = field(default=1, metadata={"help": "rows per forward/backward"})
    verify_workers: int = field(default=0, metadata={"help": "verifier worker processes (0: in-process)"})
    eval_every: int = field(default=0, metadata={"help": "held-out accuracy every N steps (0: start and end)"})
    eval_max_new_tokens: int = 0
    save_every: int = 50
    compiled_decode: bool = field(default=True, metadata={"help": "rollouts with the compiled, CUDA-graph decode "
                                                                  "step and a fixed cache length (CUDA only)"})
    algo: str = field(default="grpo", metadata={"help": "grpo | ppo (a value model, GAE; --algo ppo switches the "
                                                        "defaults to Tulu 3's PPO recipe, see PPO_RECIPE)"})
    value_model: str = field(default="", metadata={"help": "PPO: reward/value model directory to start the value "
                                                           "model from; empty: the policy (a new score head)"})
    value_lr: float = field(default=0.0, metadata={"help": "PPO: value model learning rate (0: --lr)"})
    gamma: float = field(default=1.0, metadata={"help": "PPO: GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "PPO: GAE lambda"})
    value_clip_eps: float = field(default=0.2, metadata={"help": "PPO: value clipping range"})


# The embedded default, tuned on the 2-core CPU: bigger groups (16) of fewer prompts give fewer all-equal groups;
# temperature 0.7 because the tiny model's samples at 1.0 are mostly wrong; no KL term (beta 0: no reference model
# in memory, as in several GRPO variants) - the KL path is covered by the tests.
EMBEDDED_PRESET = dict(num_samples=16, prompts_per_step=8, max_prompt_len=96, max_new_tokens=96, lr=2e-5,
                       temperature=0.7, beta=0.0, steps=40, num_mini_batches=2, save_every=10, verify_workers=0,
                       row_capacity=256, micro_batch_rows=8)


# Tulu 3's PPO (arXiv 2411.15124, its PPO hyperparameter table; open-instruct's PPO script): one answer per prompt,
# the KL to the reference as a per-token reward (k1, beta 0.05), 4 epochs over each rollout batch, lr 3e-7 for the
# policy and the value model. gamma, lambda and the clip ranges are the flags' own defaults (1, 0.95, 0.2).
PPO_RECIPE = dict(num_samples=1, prompts_per_step=64, lr=3e-7, beta=0.05, kl_estimator="k1", num_epochs=4,
                  num_mini_batches=1, temperature=1.0)

# The embedded PPO run, tuned like the GRPO one: 128 answers a step (4 to each of 32 prompts), no reference model,
# value model from the policy.
EMBEDDED_PPO_PRESET = dict(EMBEDDED_PRESET, num_samples=4, prompts_per_step=32, num_epochs=1, kl_estimator="k1")


def variant_defaults(cfg):
    return PPO_RECIPE if cfg.algo == "ppo" else {}


def embedded_preset(cfg):
    return EMBEDDED_PPO_PRESET if cfg.algo == "ppo" else EMBEDDED_PRESET


# ----------------------------------------------------------------------------------------------------------------
# GRPO pieces


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
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))
    kl = torch.zeros_like(logp) if ref_logp is None else kl_estimate(logp, ref_logp, kl_kind)
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return pg + beta * kl, kl.detach(), clipped


def token_logps(model, batch, temperature, impl, tp_group=None, entropy=False, loss_fn=None):
    """Per-token log-probs (B*T,) of the next token at the sampling temperature (0 where not trained), and the
    entropy of the tempered distribution when asked (without tensor parallel, except on the fused path).
    With loss_fn (the loss of a chunk of tokens, see kernels.fused_linear_loss) the fused kernel also forms that
    loss and its gradient in the forward pass (6NHV): -> (loss, logp detached, entropy detached or None)."""
    want_entropy = entropy and (tp_group is None or loss_fn is not None)
    if loss_fn is not None:
        base = losses.loss_head("fused", batch["targets"], impl, tp_group, loss_fn=loss_fn,
                                return_entropy=want_entropy)
    else:
        base = losses.loss_head("logprobs", batch["targets"], impl, tp_group,
                                **({"return_entropy": True} if want_entropy else {}))

    def head(hidden, weight):  # logits / T == (hidden / T) @ W^T
        return base(hidden / temperature, weight)

    out = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], head=head,
                max_seqlen=batch.get("max_seqlen"))
    return out if (want_entropy or loss_fn is not None) else (out, None)


def rollout_rows(prompts, responses, per_seq, capacity, pad_id):
    """Packs (prompt + response) sequences into rows; labels only on the response. per_seq: dict name -> list of
    per-sequence floats broadcast to the row's positions (aligned with the shifted targets: position t holds the
    value of the sequence whose token t+1 it predicts). -> list of rows (make_row dicts + those per-position
    tensors)."""
    docs = [{"input_ids": p + r, "labels": [data.IGNORE_INDEX] * len(p) + r} for p, r in zip(prompts, responses)]
    bins = data.pack([len(d["input_ids"]) for d in docs], capacity) if docs else []
    rows = []
    for b in bins:
        row = data.make_row([docs[i] for i in b], capacity, pad_id)
        for name, values in per_seq.items():
            v = torch.zeros(capacity)
            start = 0
            for i in b:
                n = len(docs[i]["input_ids"])
                v[start:start + n] = values[i]
                start += n
            row[name] = v
        rows.append(row)
    return rows


def pad_to_agreed_rows(rows, capacity, pad_id, names, device):
    """Appends padding rows (pad tokens, no trained token, zeros for the per-position `names`) up to the largest
    row count of all ranks (one all-reduce MAX), so the old-policy, reference and mini-batch passes run the same
    number of FSDP / TP forwards and backwards on every rank whatever the rollout lengths."""
    n = torch.tensor(len(rows), device=device)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    padding = [{**data.make_row([], capacity, pad_id), **{k: torch.zeros(capacity) for k in names}}
               for _ in range(int(n) - len(rows))]
    return rows + padding


GRPO_SUMS = ("loss", "kl", "clipped", "entropy", "tokens")  # what grpo_backward sums over trained tokens, in order


def grpo_backward(model, micro, cfg, impl="auto", mesh=None, use_bf16=False):
    """Forward + backward of one mini-batch of packed rollout rows (each stacked with adv/old_logp/ref_logp per
    position). Token-level normalisation: the summed token loss divided by the mini-batch's answer tokens over all
    ranks, counted first. Returns (sums (5,) of this rank, named by GRPO_SUMS; n_tokens)."""
    dp_world = 1 if mesh is None else mesh["dp"].size()
    device = micro[0]["input_ids"].device
    n_tokens = common.all_reduce_sum(sum((m["targets"] != -100).sum() for m in micro).float(), common.dp_group(mesh))
    sums = torch.zeros(5, device=device)
    fused = impl in ("auto", "fused")  # the gradient formed in the forward pass, chunk by chunk (6NHV)
    for m in common.grad_sync_on_last(model, micro):
        mask = (m["targets"].reshape(-1) != -100).float()
        ref = m["ref_logp"] if cfg.beta > 0 else None

        def token_loss(lp, s=0, e=None):  # GRPO loss of tokens [s, e)
            return grpo_token_loss(lp, m["old_logp"][s:e], None if ref is None else ref[s:e], m["adv"][s:e],
                                   cfg.clip_eps, cfg.beta, cfg.kl_estimator)

        with common.precision(model, use_bf16):
            if fused:
                loss, logp, ent = token_logps(model, m, cfg.temperature, impl, common.tp_group(mesh), entropy=True,
                                              loss_fn=lambda lp, en, s, e: (token_loss(lp, s, e)[0] * mask[s:e]).sum())
            else:
                logp, ent = token_logps(model, m, cfg.temperature, impl, common.tp_group(mesh), entropy=True)
                loss = (token_loss(logp)[0] * mask).sum()
        _, kl, clipped = token_loss(logp.detach())
        (loss * dp_world / n_tokens.clamp(min=1)).backward()
        ent_sum = (ent.detach() * mask).sum() if ent is not None else torch.zeros((), device=device)
        sums += torch.stack([loss.detach(), (kl * mask).sum(), (clipped.float() * mask).sum(), ent_sum, mask.sum()])
    return sums, n_tokens


@torch.no_grad()
def fill_logps(model, rows, name, cfg, device, use_bf16, tp_group):
    """Adds row[name] (capacity,) = per-token log-probs of `model` (the old policy, or the reference)."""
    model.eval()
    for i in range(0, len(rows), cfg.micro_batch_rows):
        chunk = rows[i:i + cfg.micro_batch_rows]
        with common.precision(model, use_bf16):
            lp, _ = token_logps(model, data.stack_rows(chunk, device), cfg.temperature, cfg.loss_impl, tp_group)
        for r, v in zip(chunk, lp.float().cpu().view(len(chunk), -1)):
            r[name] = v
    model.train()


# ----------------------------------------------------------------------------------------------------------------
# PPO pieces (the maths in nanotulu/ppo.py): a value model beside the policy, per-token rewards, GAE

PPO_SUMS = GRPO_SUMS + ("value_loss", "value_clipped")  # what ppo_backward sums over trained tokens, in order


@torch.no_grad()
def fill_values(value_model, rows, cfg, device, use_bf16, tp_group):
    """Adds row["old_value"] (capacity,) = the value model's per-token values at rollout time."""
    value_model.eval()
    for i in range(0, len(rows), cfg.micro_batch_rows):
        chunk = rows[i:i + cfg.micro_batch_rows]
        b = data.stack_rows(chunk, device)
        with common.precision(value_model, use_bf16):
            v = value_model(b["input_ids"], b["position_ids"], b["cu_seqlens"], head=losses.score_head(tp_group),
                            max_seqlen=b.get("max_seqlen"))
        for r, x in zip(chunk, v.float().cpu().view(len(chunk), -1)):
            r["old_value"] = x
    value_model.train()


def ppo_backward(model, value_model, micro, cfg, impl="auto", mesh=None, use_bf16=False):
    """Forward + backward of the policy and the value model over one mini-batch of packed rollout rows (stacked with
    adv / ret / old_logp / old_value per position): clipped policy loss and clipped value loss, each summed over the
    answer tokens and divided by the mini-batch's answer tokens over all ranks. Returns (sums of this rank named by
    PPO_SUMS; n_tokens)."""
    dp_world = 1 if mesh is None else mesh["dp"].size()
    tpg = common.tp_group(mesh)
    device = micro[0]["input_ids"].device
    n_tokens = common.all_reduce_sum(sum((m["targets"] != -100).sum() for m in micro).float(), common.dp_group(mesh))
    scale = dp_world / n_tokens.clamp(min=1)  # data-parallel reduction averages over ranks: the mean wants the sum
    sums = torch.zeros(len(PPO_SUMS), device=device)
    # gradients reduced over the data-parallel ranks only in the last micro-batch's backward, for both models
    for m, _ in zip(common.grad_sync_on_last(model, micro), common.grad_sync_on_last(value_model, micro)):
        mask = (m["targets"].reshape(-1) != -100).float()

        def pg_loss(lp, s=0, e=None):  # clipped policy loss of tokens [s, e)
            return ppo.policy_loss(lp, m["old_logp"][s:e], m["adv"][s:e], cfg.clip_eps)

        with common.precision(model, use_bf16):
            if impl in ("auto", "fused"):  # the gradient formed in the forward pass, chunk by chunk (6NHV)
                loss, logp, ent = token_logps(model, m, cfg.temperature, impl, tpg, entropy=True,
                                              loss_fn=lambda lp, en, s, e: (pg_loss(lp, s, e)[0] * mask[s:e]).sum())
            else:
                logp, ent = token_logps(model, m, cfg.temperature, impl, tpg, entropy=True)
                loss = (pg_loss(logp)[0] * mask).sum()
        (loss * scale).backward()
        with common.precision(value_model, use_bf16):
            values = value_model(m["input_ids"], m["position_ids"], m["cu_seqlens"], head=losses.score_head(tpg),
                                 max_seqlen=m.get("max_seqlen"))
        vf, v_clipped = ppo.value_loss(values.float(), m["old_value"], m["ret"], cfg.value_clip_eps)
        v_loss = (vf * mask).sum()
        (v_loss * scale).backward()
        kl = m["old_logp"] - m["ref_logp"] if "ref_logp" in m else torch.zeros_like(mask)  # k1 of the rollout
        ent_sum = (ent.detach() * mask).sum() if ent is not None else torch.zeros((), device=device)
        sums += torch.stack([loss.detach(), (kl * mask).sum(), (pg_loss(logp.detach())[1].float() * mask).sum(),
                             ent_sum, mask.sum(), v_loss.detach(), (v_clipped.float() * mask).sum()])
    return sums, n_tokens


def ppo_rows(model, ref_model, value_model, group_prompts, outs, rew, cfg, capacity, pad_id, device, use_bf16, mesh):
    """Phase 3 for PPO: every rollout packed into rows (padded to the agreed row count) with its old-policy log-probs,
    reference log-probs (with a KL term), values, then advantages (GAE, whitened over all ranks) and returns."""
    tpg = common.tp_group(mesh)
    rows = rollout_rows(group_prompts, [o["tokens"] for o in outs], {"final_reward": rew.tolist()}, capacity, pad_id)
    rows = pad_to_agreed_rows(rows, capacity, pad_id, ("final_reward",), device)
    fill_logps(model, rows, "old_logp", cfg, device, use_bf16, tpg)
    if ref_model is not None:
        with lora.adapters_off(ref_model):  # LoRA: the reference may be the policy itself, adapters off
            fill_logps(ref_model, rows, "ref_logp", cfg, device, use_bf16, tpg)
    fill_values(value_model, rows, cfg, device, use_bf16, tpg)
    ppo.advantages_and_returns(rows, cfg.beta, cfg.gamma, cfg.lam, common.dp_group(mesh))
    return rows


def ppo_update(model, value_model, optimizer, rows, cfg, step, mesh, device, use_bf16):
    """Phase 4 for PPO: num_epochs passes in num_mini_batches steps of the one optimizer over both models (policy in
    param group 0, value model in group 1, each clipped to max_grad_norm on its own). -> (PPO_SUMS sums, last
    policy grad norm, last lr)."""
    names = ("adv", "ret", "old_logp", "old_value") + (("ref_logp",) if cfg.beta > 0 else ())
    sums, grad_norm, lr = torch.zeros(len(PPO_SUMS), device=device), torch.zeros(()), cfg.lr
    for lr, micro in mini_batches(rows, cfg, step, device, names):
        sums += ppo_backward(model, value_model, micro, cfg, cfg.loss_impl, mesh, use_bf16)[0]
        grad_norm = common.clip_grad_norm(model, cfg.max_grad_norm)
        common.clip_grad_norm(value_model, cfg.max_grad_norm)
        optimizer.param_groups[0]["lr"] = lr
        optimizer.param_groups[1]["lr"] = lr * (cfg.value_lr or cfg.lr) / cfg.lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, lr


class PromptSampler:
    """Each step, `per_step` prompt indices for this rank: epochs of seeded permutations, rank r takes every
    world-th prompt of the step's slice, so ranks never share a prompt and all run the same number of steps."""

    def __init__(self, n, per_step_all_ranks, rank, world, seed):
        if per_step_all_ranks % world or per_step_all_ranks > n:
            raise ValueError(f"--prompts_per_step {per_step_all_ranks} must be a multiple of the data-parallel "
                             f"ranks ({world}) and at most the {n} prompts")
        self.n, self.g, self.rank, self.world, self.seed = n, per_step_all_ranks, rank, world, seed
        self.epoch, self.step = 0, 0

    def next(self):
        if (self.step + 1) * self.g > self.n:
            self.epoch, self.step = self.epoch + 1, 0
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        chunk = perm[self.step * self.g:(self.step + 1) * self.g]
        self.step += 1
        return [int(i) for i in chunk[self.rank::self.world]]

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, s):
        self.epoch, self.step = s["epoch"], s["step"]


# ----------------------------------------------------------------------------------------------------------------


def resolve_embedded_start(rank):
    """The embedded pipeline's latest stage: DPO output, else SFT output, else run the embedded SFT now."""
    for d in ("runs/dpo/final", "runs/sft/final"):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    if rank == 0:
        print("no embedded SFT/DPO model yet: running the embedded SFT first")
    from nanotulu import train_sft
    return train_sft.main(["--output_dir", "runs/sft"], finish=False)


def check_flags(cfg):
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"--kl_estimator {cfg.kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
    if cfg.algo not in ("grpo", "ppo"):
        raise ValueError(f"--algo {cfg.algo!r}: expected grpo or ppo")
    if cfg.algo == "grpo" and cfg.num_samples < 2:
        raise ValueError("--num_samples must be >= 2: group-normalised advantages need a group")
    if cfg.row_capacity and cfg.row_capacity < cfg.max_prompt_len + cfg.max_new_tokens:
        raise ValueError(f"--row_capacity {cfg.row_capacity} cannot hold a prompt + answer of "
                         f"{cfg.max_prompt_len + cfg.max_new_tokens} tokens")


def load_tasks(cfg, is_embedded, tok, template):
    """-> (training rows, their prompt token ids, held-out rows); prompts longer than --max_prompt_len refused."""
    rows = rewards.load_rlvr_mix(cfg.data or embedded.asset("rlvr_train.jsonl"), cfg.seed)
    eval_data = cfg.eval_data or (embedded.asset("rlvr_test.jsonl") if is_embedded else "")
    eval_rows = rewards.load_rlvr_mix(eval_data, cfg.seed) if eval_data else []
    prompts = data_prompts(rows, tok, template)
    too_long = [r["source"] for r, p in zip(rows, prompts) if len(p) > cfg.max_prompt_len]
    if too_long:
        raise ValueError(f"{too_long[0]}: prompt longer than --max_prompt_len {cfg.max_prompt_len} "
                         f"({len(too_long)} such rows); raise the limit or filter the data")
    return rows, prompts, eval_rows


def load_reference(cfg, ref_dir, model, load_placed):
    """The frozen reference of the KL term (None with --beta 0: no second model in memory)."""
    if cfg.beta <= 0:
        return None
    if lora.enabled(cfg):  # LoRA: the policy with its adapters off (lora.adapters_off around each reference pass)
        return model
    ref_model = load_placed(ref_dir, check_like=model)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    return ref_model.eval()


def held_out(model, tok, eval_rows, cfg, template, rank, at_step):
    """Greedy accuracy of the verifiers on the held-out rows (printed and appended to output_dir/eval.jsonl)."""
    if not eval_rows:
        return None
    from nanotulu.eval import evaluate
    res = evaluate(model, tok, eval_rows, batch_size=256, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                   template=template, progress=False)
    acc = res["overall"]["score"]
    if rank == 0:
        per = ", ".join(f"{k} {v['score']:.3f}" for k, v in res["datasets"].items())
        print(f"held-out accuracy at step {at_step}: {acc:.3f} ({per})")
        with open(os.path.join(cfg.output_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"step": at_step, "accuracy": acc, **{f"accuracy/{k}": v["score"]
                                                                     for k, v in res["datasets"].items()}}) + "\n")
    return acc


def rollout(model, prompts, cfg, tok, gen_seed, mesh):
    """Phase 1: num_samples answers to each prompt, sampled by the policy itself (each prompt prefilled once for
    its group; on CUDA the compiled, CUDA-graph decode step with one cache length for every step). The FSDP / TP
    weights are gathered once (every rank enters), then no collective per decode step, so ranks may stop at
    different lengths. Under tensor parallel the ranks of a TP group share their prompts: each samples the groups
    of every tp-th prompt and the answers are exchanged, so the group holds identical rollouts.
    -> (group prompts, outputs) in group order."""
    tpg = common.tp_group(mesh)
    tp_rank, tp = (dist.get_rank(tpg), dist.get_world_size(tpg)) if tpg is not None else (0, 1)
    n, compiled = cfg.num_samples, cfg.compiled_decode and gen_seed.device.type == "cuda"
    mine = prompts[tp_rank::tp]
    with gathered(model) as m:
        outs = generate(m, mine, num_samples=n, max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                        temperature=cfg.temperature, seed=gen_seed, compile=compiled,
                        max_len=cfg.max_prompt_len + cfg.max_new_tokens if compiled else None) if mine else []
    if tpg is not None:
        parts = [None] * tp
        dist.all_gather_object(parts, outs, group=tpg)
        # prompt j was sampled by TP rank j % tp, as its (j // tp)-th group
        outs = [o for j in range(len(prompts)) for o in parts[j % tp][(j // tp) * n:(j // tp + 1) * n]]
    return [p for p in prompts for _ in range(n)], outs


def score(outs, tasks, cfg, tok):
    """Phase 2: verifier scores of the answers and their rewards (x reward_scale; the non-stop penalty for answers
    cut off by the length limit). -> (scores list, rewards (n,), finished list, verifier stats)."""
    texts = [tok.decode([t for t in o["tokens"] if t != tok.eos_token_id], skip_special_tokens=True) for o in outs]
    tasks = [t for t in tasks for _ in range(cfg.num_samples)]
    scores, vstats = rewards.verify_batch([t["dataset"] for t in tasks], texts, [t["ground_truth"] for t in tasks],
                                          workers=cfg.verify_workers)
    finished = [o["finish_reason"] == "stop" for o in outs]
    penalty = None if cfg.nonstop_penalty != cfg.nonstop_penalty else cfg.nonstop_penalty  # nan: off
    rew = torch.tensor([rewards.score_to_reward(s, f, scale=cfg.reward_scale, nonstop_penalty=penalty)
                        for s, f in zip(scores, finished)], dtype=torch.float64)
    return scores, rew, finished, vstats


def build_rows(model, ref_model, group_prompts, outs, adv, keep, cfg, capacity, pad_id, device, use_bf16, tpg):
    """Phase 3: the kept rollouts packed into rows (padded to the row count agreed by all ranks) with their
    per-token advantage, old-policy log-prob and (with a KL term) reference log-prob."""
    rows = rollout_rows([group_prompts[i] for i in keep], [outs[i]["tokens"] for i in keep],
                        {"adv": adv[keep].tolist()}, capacity, pad_id)
    rows = pad_to_agreed_rows(rows, capacity, pad_id, ("adv",), device)
    fill_logps(model, rows, "old_logp", cfg, device, use_bf16, tpg)
    if ref_model is not None:
        with lora.adapters_off(ref_model):  # LoRA: the reference may be the policy itself, adapters off
            fill_logps(ref_model, rows, "ref_logp", cfg, device, use_bf16, tpg)
    return rows


def mini_batches(rows, cfg, step, device, names):
    """The update schedule of one rollout batch: num_epochs passes over the rows in num_mini_batches slices (fewer
    when there are fewer rows: every rank has the same row count, so all take the same steps). Yields, per optimizer
    step, (its learning rate, its stacked micro-batches with the per-position `names`)."""
    n_mb = min(cfg.num_mini_batches, len(rows))
    total_updates = cfg.steps * cfg.num_epochs * cfg.num_mini_batches
    for epoch in range(cfg.num_epochs):
        for k in range(n_mb):
            update_idx = (step * cfg.num_epochs + epoch) * cfg.num_mini_batches + k
            lr = common.lr_at(update_idx, total_updates, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
            mb = rows[k * len(rows) // n_mb:(k + 1) * len(rows) // n_mb]
            yield lr, data.micro_batches(mb, cfg.micro_batch_rows, device, per_position=names)


def update(model, optimizer, rows, cfg, step, mesh, device, use_bf16):
    """Phase 4: num_epochs passes over the rollout rows in num_mini_batches optimizer steps each (fewer when there
    are fewer rows: every rank has the same row count, so all take the same steps).
    -> (GRPO_SUMS sums (5,) of this rank, last grad norm, last lr)."""
    names = ("adv", "old_logp") + (("ref_logp",) if cfg.beta > 0 else ())
    sums, grad_norm, lr = torch.zeros(len(GRPO_SUMS), device=device), torch.zeros(()), cfg.lr
    for lr, micro in mini_batches(rows, cfg, step, device, names):
        sums += grpo_backward(model, micro, cfg, cfg.loss_impl, mesh, use_bf16)[0]
        grad_norm = common.optimizer_step(model, optimizer, lr, cfg.max_grad_norm)
    return sums, grad_norm, lr


def check_prompts_per_step(cfg, n_prompts, world):
    """Before any model loads: each step's prompts split evenly over the data-parallel ranks."""
    dp = common.planned_dp_world(cfg, world)
    if cfg.prompts_per_step % dp or cfg.prompts_per_step > n_prompts:
        raise ValueError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the data-parallel ranks "
                         f"({dp}) and at most the {n_prompts} prompts of --data: lower --prompts_per_step or add data")


def trainables(model, value_model, cfg, device):
    """-> (what a checkpoint holds, its optimizer): the policy, or for PPO the policy and the value model in one
    container with one AdamW (param group 0 the policy, group 1 the value model)."""
    if value_model is None:
        return model, common.make_optimizer(model, cfg, device)
    pair = torch.nn.ModuleDict({"policy": model, "value": value_model})
    groups = [{"params": model.parameters()}, {"params": value_model.parameters()}]
    return pair, torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def step_metrics(loss_sums, rew, scores, outs, equal, finished, vstats, grad_norm, lr, t_gen, t_train, cfg, mesh,
                 device):
    """One step's logged values: named sums of this rank reduced over the data-parallel ranks at once, then
    averaged per answer or per trained token."""
    names = GRPO_SUMS if len(loss_sums) == len(GRPO_SUMS) else PPO_SUMS
    tot = common.reduce_named({**dict(zip(names, loss_sums)), "reward": rew.sum(), "score": sum(scores),
                               "correct": sum(s >= 1.0 for s in scores), "responses": len(outs),
                               "response_tokens": sum(len(o["tokens"]) for o in outs),
                               "equal_groups": int(equal.sum()), "stopped": sum(finished)}, common.dp_group(mesh),
                              device)
    n, n_tok, dp_world = tot["responses"], tot["tokens"].clamp(min=1), common.dp_coords(mesh, 0, 1)[1]
    values = {"reward": tot["reward"] / n, "score": tot["score"] / n, "accuracy": tot["correct"] / n,
              "loss": tot["loss"] / n_tok, "kl": tot["kl"] / n_tok, "clip_frac": tot["clipped"] / n_tok,
              "entropy": tot["entropy"] / n_tok, "response_len": tot["response_tokens"] / n,
              "stopped": tot["stopped"] / n, "equal_groups": tot["equal_groups"], "lr": lr, "grad_norm": grad_norm,
              "gen_tok/s": tot["response_tokens"] / dp_world / max(t_gen, 1e-9),
              "train_tok/s": n_tok / dp_world * cfg.num_epochs / max(t_train, 1e-9), "gen_s": t_gen,
              "train_s": t_train, "verify_errors": vstats.get("error", 0) + vstats.get("timeout", 0)}
    if names is PPO_SUMS:
        values.update({"value_loss": tot["value_loss"] / n_tok, "value_clip_frac": tot["value_clipped"] / n_tok})
    return values


def main(argv=None, finish=True):
    cfg, is_embedded, rank, world, device, use_bf16 = common.start(RLVRConfig, embedded_preset, argv, "RLVR",
                                                                   variant=variant_defaults)
    check_flags(cfg)
    lora.check_flags(cfg)  # LoRA
    if cfg.lora_adapter and cfg.beta > 0:  # LoRA
        raise ValueError("--lora_adapter with --beta > 0: the KL reference (adapters off) would be the base without "
                         "that adapter; merge it first (--merge in its stage) and start from the merged model")
    tok = data.load_tokenizer(cfg.tokenizer or ("byte" if is_embedded else cfg.model))
    template = data.resolve_template(cfg.template, tok)  # a bad --template fails before any work
    tasks, prompts, eval_rows = load_tasks(cfg, is_embedded, tok, template)
    check_prompts_per_step(cfg, len(tasks), world)
    model_dir = resolve_embedded_start(rank) if is_embedded else cfg.model
    capacity = cfg.row_capacity or cfg.max_prompt_len + cfg.max_new_tokens
    mesh = common.make_mesh(cfg, world, device)

    def load_placed(path, check_like=None, score_head=None, adapters=False):
        m = common.load_model(path, tok, device, cfg, score_head=score_head)
        if adapters:  # LoRA: the policy and the value model (its score head trained too) get adapters
            m = lora.apply(m, cfg, torch.bfloat16 if use_bf16 else None, train_head=bool(score_head))
        if check_like is not None and checkpoint.model_shape(m) != checkpoint.model_shape(check_like):
            raise ValueError(f"--ref_model {path}: its shape differs from the policy {model_dir}")
        return common.place(m, mesh, cfg, use_bf16, seq_len=capacity)

    model = load_placed(model_dir, adapters=True)
    ref_model = load_reference(cfg, cfg.ref_model or model_dir, model, load_placed)
    value_model = load_placed(cfg.value_model or model_dir, score_head=True, adapters=True) if cfg.algo == "ppo" \
        else None
    dp_rank, dp_world = common.dp_coords(mesh, rank, world)
    sampler = PromptSampler(len(tasks), cfg.prompts_per_step, dp_rank, dp_world, cfg.seed)
    trained, optimizer = trainables(model, value_model, cfg, device)
    ckpt_dir, step = checkpoint.resume(cfg, trained, optimizer, sampler, rank, world)
    if rank == 0:
        common.truncate_jsonl(os.path.join(cfg.output_dir, "eval.jsonl"), step)  # later steps are replayed

    os.makedirs(cfg.output_dir, exist_ok=True)
    if step == 0:
        held_out(model, tok, eval_rows, cfg, template, rank, 0)
    metrics = common.Metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), cfg.steps, rank, step, desc="rlvr",
                             report_to=cfg.report_to, config=vars(cfg))
    gen_seed = torch.Generator(device=device)
    while step < cfg.steps:
        t0 = time.perf_counter()
        idx = sampler.next()
        gen_seed.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
        group_prompts, outs = rollout(model, [prompts[i] for i in idx], cfg, tok, gen_seed, mesh)
        t_gen = time.perf_counter() - t0
        scores, rew, finished, vstats = score(outs, [tasks[i] for i in idx], cfg, tok)
        if step == 0 and rank == 0 and not any(scores):
            print("warning: every answer of the first rollout batch failed verification: no reward signal yet")
        if value_model is None:  # GRPO: group-normalised advantages
            adv, equal = group_advantages(rew, cfg.num_samples)
            keep = [i for i in range(len(outs)) if not (cfg.drop_equal_groups and equal[i // cfg.num_samples])]
            rows = build_rows(model, ref_model, group_prompts, outs, adv, keep, cfg, capacity, tok.pad_token_id,
                              device, use_bf16, common.tp_group(mesh))
            t1 = time.perf_counter()
            loss_sums, grad_norm, lr = update(model, optimizer, rows, cfg, step, mesh, device, use_bf16)
        else:  # PPO: per-token rewards, values, GAE
            equal = torch.zeros(len(idx), dtype=torch.bool)
            rows = ppo_rows(model, ref_model, value_model, group_prompts, outs, rew, cfg, capacity, tok.pad_token_id,
                            device, use_bf16, mesh)
            t1 = time.perf_counter()
            loss_sums, grad_norm, lr = ppo_update(model, value_model, optimizer, rows, cfg, step, mesh, device,
                                                  use_bf16)
        t_train = time.perf_counter() - t1
        step += 1

        metrics.log(step, step_metrics(loss_sums, rew, scores, outs, equal, finished, vstats, grad_norm, lr, t_gen,
                                       t_train, cfg, mesh, device), show=("reward", "accuracy", "kl", "response_len"))
        common.exit_if_asked(cfg, step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            held_out(model, tok, eval_rows, cfg, template, rank, step)
        checkpoint.save_if_due(cfg, ckpt_dir, step, cfg.steps, trained, optimizer, sampler, rank)
    metrics.close()
    final_acc = held_out(model, tok, eval_rows, cfg, template, rank, step)
    if value_model is not None:  # the value model too, as a reward-model checkpoint
        save_hf = lora.save_merged if lora.enabled(cfg) else checkpoint.save_hf  # LoRA: adapters folded in
        save_hf(value_model, os.path.join(cfg.output_dir, "final_value"), None if is_embedded else tok, template,
                rank=rank)
    finish_run = lora.finish_run if lora.enabled(cfg) else common.finish_run  # LoRA: adapter (+ merged) export
    return finish_run(cfg, model, is_embedded, tok, rank, finish, template), final_acc


def data_prompts(rows, tok, template):
    """Prompt token ids of each RLVR row: the chat template with the generation prompt."""
    return [tok.encode(data.render_chat(r["prompt_messages"], template, tok.eos_token, True, tok.bos_token))
            for r in rows]


if __name__ == "__main__":
    main()
