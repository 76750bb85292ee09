"""What GRPO and PPO share: sampling answers with the policy itself, scoring them with the verifiers, packing the
rollouts into rows (padded to the row count every rank agrees on), per-token log-probs of a model over those rows
through the fused head (at the sampling temperature), and the update schedule of one rollout batch."""

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from nanotulu import data, losses, rewards
from nanotulu.generate import generate
from nanotulu.lora import adapters_off
from nanotulu.parallel import gathered, precision, tp_group
from nanotulu.run import lr_at


@dataclasses.dataclass
class RolloutParams:
    """Sampling and scoring of one rollout batch."""
    num_samples: int = 16  # answers per prompt
    max_prompt_len: int = 2048
    max_new_tokens: int = 2048
    temperature: float = 1.0
    compiled_decode: bool = True  # CUDA only: the compiled, CUDA-graph decode step with a fixed cache length
    reward_scale: float = 10.0
    nonstop_penalty: float = float("nan")  # reward of a cut-off answer (nan: off)
    verify_workers: int = 0


@dataclasses.dataclass
class UpdateSchedule:
    """The optimizer steps of one rollout batch: num_epochs passes in num_mini_batches steps each, the learning rate
    of each from the schedule over steps x num_epochs x num_mini_batches updates."""
    steps: int = 100
    num_epochs: int = 1
    num_mini_batches: int = 1
    lr: float = 5e-7
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0


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


def rollout(model, prompts, hp, tok, gen_seed, mesh):
    """num_samples answers to each prompt, sampled by the policy itself (each prompt prefilled once for its group;
    on CUDA the compiled, CUDA-graph decode step with one cache length for every step). The FSDP / TP weights are
    gathered once (every rank enters), then no collective per decode step, so ranks may stop at different lengths.
    Under tensor parallel the ranks of a TP group share their prompts: each samples the groups of every tp-th
    prompt and the answers are exchanged, so the group holds identical rollouts. hp: RolloutParams.
    -> (group prompts, outputs) in group order."""
    tpg = tp_group(mesh)
    tp_rank, tp = (dist.get_rank(tpg), dist.get_world_size(tpg)) if tpg is not None else (0, 1)
    n, compiled = hp.num_samples, hp.compiled_decode and gen_seed.device.type == "cuda"
    mine = prompts[tp_rank::tp]
    with gathered(model) as m:
        outs = generate(m, mine, num_samples=n, max_new_tokens=hp.max_new_tokens, eos_token_id=tok.eos_token_id,
                        temperature=hp.temperature, seed=gen_seed, compile=compiled,
                        max_len=hp.max_prompt_len + hp.max_new_tokens if compiled else None) if mine else []
    if tpg is not None:
        parts = [None] * tp
        dist.all_gather_object(parts, outs, group=tpg)
        # prompt j was sampled by TP rank j % tp, as its (j // tp)-th group
        outs = [o for j in range(len(prompts)) for o in parts[j % tp][(j // tp) * n:(j // tp + 1) * n]]
    return [p for p in prompts for _ in range(n)], outs


def score(outs, tasks, hp, tok):
    """Verifier scores of the answers and their rewards (x reward_scale; the non-stop penalty for answers cut off by
    the length limit). -> (scores list, rewards (n,) float64, finished list, verifier stats)."""
    texts = [tok.decode([t for t in o["tokens"] if t != tok.eos_token_id], skip_special_tokens=True) for o in outs]
    tasks = [t for t in tasks for _ in range(hp.num_samples)]
    scores, vstats = rewards.verify_batch([t["dataset"] for t in tasks], texts, [t["ground_truth"] for t in tasks],
                                          workers=hp.verify_workers)
    finished = [o["finish_reason"] == "stop" for o in outs]
    penalty = None if hp.nonstop_penalty != hp.nonstop_penalty else hp.nonstop_penalty  # nan: off
    rew = torch.tensor([rewards.score_to_reward(s, f, scale=hp.reward_scale, nonstop_penalty=penalty)
                        for s, f in zip(scores, finished)], dtype=torch.float64)
    return scores, rew, finished, vstats


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
    row count of all ranks (one all-reduce MAX, on `device`), so the old-policy, reference and mini-batch passes
    run the same number of FSDP / TP forwards and backwards on every rank whatever the rollout lengths."""
    n = torch.tensor(len(rows), device=device)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    padding = [{**data.make_row([], capacity, pad_id), **{k: torch.zeros(capacity) for k in names}}
               for _ in range(int(n) - len(rows))]
    return rows + padding


def token_logps(model, batch, temperature, impl, tp_group=None, entropy=False, loss_fn=None):
    """Per-token log-probs (B*T,) of the next token at the sampling temperature (0 where not trained), through
    losses.loss_head: -> (loss or None, logp, entropy or None). With loss_fn (the loss of a chunk of tokens) the
    loss carries the gradient and logp / entropy are detached."""
    head = losses.loss_head(batch["targets"], impl, tp_group, loss_fn=loss_fn, entropy=entropy,
                            temperature=temperature)
    return model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], head=head,
                 max_seqlen=batch.get("max_seqlen"))


@torch.no_grad()
def fill_logps(model, rows, name, temperature, impl, micro_batch_rows, device, use_bf16, tp_group):
    """Adds row[name] (capacity,) = per-token log-probs of `model` (the old policy, or the reference)."""
    model.eval()
    for i in range(0, len(rows), micro_batch_rows):
        chunk = rows[i:i + micro_batch_rows]
        with precision(model, use_bf16):
            _, lp, _ = token_logps(model, data.stack_rows(chunk, device), temperature, impl, tp_group)
        for r, v in zip(chunk, lp.float().cpu().view(len(chunk), -1)):
            r[name] = v
    model.train()



def fill_old_and_ref_logps(model, ref_model, rows, hp, device, use_bf16, tpg):
    """row["old_logp"] from the policy and, with a reference (a KL term), row["ref_logp"]: the rows both GRPO and PPO
    train on. A LoRA run's reference is the policy itself, with its adapters off. hp: GRPOParams or PPOParams."""
    fill_logps(model, rows, "old_logp", hp.temperature, hp.loss_impl, hp.micro_batch_rows, device, use_bf16, tpg)
    if ref_model is not None:
        with adapters_off(ref_model):
            fill_logps(ref_model, rows, "ref_logp", hp.temperature, hp.loss_impl, hp.micro_batch_rows, device,
                       use_bf16, tpg)


def mini_batches(rows, sched, step, device, names, micro_batch_rows):
    """The update schedule of one rollout batch: num_epochs passes over the rows in num_mini_batches slices (fewer
    when there are fewer rows: every rank has the same row count, so all take the same steps). Yields, per optimizer
    step, (its learning rate, its stacked micro-batches with the per-position `names`)."""
    n_mb = min(sched.num_mini_batches, len(rows))
    total_updates = sched.steps * sched.num_epochs * sched.num_mini_batches
    for epoch in range(sched.num_epochs):
        for k in range(n_mb):
            update_idx = (step * sched.num_epochs + epoch) * sched.num_mini_batches + k
            lr = lr_at(update_idx, total_updates, sched.lr, sched.warmup_ratio, sched.lr_schedule)
            mb = rows[k * len(rows) // n_mb:(k + 1) * len(rows) // n_mb]
            yield lr, data.micro_batches(mb, micro_batch_rows, device, per_position=names)
