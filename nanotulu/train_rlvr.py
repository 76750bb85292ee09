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
Log-probs come from the fused kernel (linear_logprobs) at the sampling temperature: logits / T. The algorithms are
in algos/rollout.py, algos/grpo.py and algos/ppo.py; this script holds the flags, the prompts and the loop.
"""

import json
import os
import time
from dataclasses import field

import torch

from nanotulu import checkpoint, data, embedded, lora, parallel, rewards, run
from nanotulu.algos.grpo import GRPO_SUMS, KL_ESTIMATORS, GRPOParams, build_rows, group_advantages, update
from nanotulu.algos.ppo import PPO_SUMS, PPOParams, ppo_rows, ppo_update
from nanotulu.algos.rollout import PromptSampler, RolloutParams, UpdateSchedule, rollout, score
from nanotulu.flags import TrainFlags, pick, recipe, shared
from nanotulu.train_sft import embedded_sft_model


@recipe(output_dir="runs/rlvr", lr=5e-7, lr_schedule="constant", warmup_ratio=0.0, save_every=50,
        help=dict(model="HF directory of the starting policy; empty: embedded",
                  data="mix 'file[:amount],...' of RLVR rows (amount: 0.5 = fraction, 500 = rows)",
                  eval_data="held-out RLVR rows for accuracy, a mix as --data",
                  eval_every="held-out accuracy every N steps (0: start and end)",
                  micro_batch_rows="rows per forward/backward"))
class RLVRConfig(TrainFlags, lora.LoRAFlags):  # LoRA: its flags
    """GRPO with verifiable rewards. Defaults are open-instruct's GRPO recipe for Tulu 3.1 8B; with no --model the
    embedded model (after the embedded SFT/DPO) and the shipped verifiable tasks are used with a preset."""
    ref_model: str = shared("ref_model", "", "frozen reference for the KL term; empty: --model")
    num_samples: int = field(default=16, metadata={"help": "answers sampled per prompt (the GRPO group)"})
    prompts_per_step: int = field(default=48, metadata={"help": "prompts per rollout batch, all ranks"})
    max_prompt_len: int = field(default=2048, metadata={"help": "longest prompt in tokens (a longer one is refused)"})
    max_new_tokens: int = field(default=2048, metadata={"help": "longest answer sampled, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the log-probs use it too)"})
    beta: float = shared("beta", 0.01, "KL coefficient (0: no reference model at all)")
    kl_estimator: str = field(default="k3", metadata={"help": "k1 | k2 | k3"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO-clip range of the policy ratio"})
    num_epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    num_mini_batches: int = field(default=1, metadata={"help": "optimizer steps per pass"})
    reward_scale: float = field(default=10.0, metadata={"help": "verifier reward of a correct answer"})
    nonstop_penalty: float = field(default=float("nan"), metadata={"help": "reward of a cut-off answer (nan: off)"})
    drop_equal_groups: bool = field(default=False, metadata={"help": "drop groups whose rewards are all equal"})
    steps: int = field(default=100, metadata={"help": "rollout batches (each: generate, score, update)"})
    row_capacity: int = field(default=0, metadata={"help": "packed row length (0: max_prompt_len+max_new_tokens)"})
    verify_workers: int = field(default=0, metadata={"help": "verifier worker processes (0: in-process)"})
    eval_max_new_tokens: int = field(default=0, metadata={"help": "answer length of the held-out evaluation "
                                                                     "(0: --max_new_tokens)"})
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


def resolve_embedded_start(rank):
    """The embedded pipeline's latest stage: DPO output, else SFT output, else run the embedded SFT now."""
    if os.path.isfile(os.path.join("runs/dpo/final", "config.json")):
        return "runs/dpo/final"
    return embedded_sft_model(rank)


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


def check_prompts_per_step(cfg, n_prompts, world):
    """Before any model loads: each step's prompts split evenly over the data-parallel ranks."""
    dp = run.planned_dp_world(cfg, world)
    if cfg.prompts_per_step % dp or cfg.prompts_per_step > n_prompts:
        raise ValueError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the data-parallel ranks "
                         f"({dp}) and at most the {n_prompts} prompts of --data: lower --prompts_per_step or add data")


def trainables(model, value_model, cfg, device):
    """-> (what a checkpoint holds, its optimizer): the policy, or for PPO the policy and the value model in one
    container with one AdamW (param group 0 the policy, group 1 the value model)."""
    if value_model is None:
        return model, run.make_optimizer(model, cfg, device)
    pair = torch.nn.ModuleDict({"policy": model, "value": value_model})
    groups = [{"params": model.parameters()}, {"params": value_model.parameters()}]
    return pair, torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def step_metrics(loss_sums, rew, scores, outs, equal, finished, vstats, grad_norm, lr, t_gen, t_train, cfg, mesh,
                 device):
    """One step's logged values: named sums of this rank reduced over the data-parallel ranks at once, then
    averaged per answer or per trained token."""
    names = GRPO_SUMS if len(loss_sums) == len(GRPO_SUMS) else PPO_SUMS
    tot = parallel.reduce_named({**dict(zip(names, loss_sums)), "reward": rew.sum(), "score": sum(scores),
                               "correct": sum(s >= 1.0 for s in scores), "responses": len(outs),
                               "response_tokens": sum(len(o["tokens"]) for o in outs),
                               "equal_groups": int(equal.sum()), "stopped": sum(finished)}, parallel.dp_group(mesh),
                              device)
    n, n_tok, dp_world = tot["responses"], tot["tokens"].clamp(min=1), parallel.dp_coords(mesh, 0, 1)[1]
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
    cfg, is_embedded, rank, world, device, use_bf16 = run.start(RLVRConfig, embedded_preset, argv, "RLVR",
                                                                   variant=variant_defaults)
    if done := run.finished_run(cfg, rank, finish):  # a rerun of a finished run: its final/
        return done
    check_flags(cfg)
    lora.check_flags(cfg)  # LoRA
    if cfg.lora_adapter and cfg.beta > 0:  # LoRA
        raise ValueError("--lora_adapter with --beta > 0: the KL reference (adapters off) would be the base without "
                         "that adapter; merge it first (--merge in its stage) and start from the merged model")
    tok = data.load_tokenizer(cfg.tokenizer or ("byte" if is_embedded else cfg.model))
    template = data.resolve_template(cfg.template, tok)  # a bad --template fails before any work
    if rank == 0:
        print(data.describe_template(cfg.template, template, tok))
    tasks, prompts, eval_rows = load_tasks(cfg, is_embedded, tok, template)
    check_prompts_per_step(cfg, len(tasks), world)
    model_dir = resolve_embedded_start(rank) if is_embedded else cfg.model
    capacity = cfg.row_capacity or cfg.max_prompt_len + cfg.max_new_tokens
    mesh = parallel.make_mesh(cfg, world, device)

    def load_placed(path, check_like=None, score_head=None, adapters=False):
        m = run.load_model(path, tok, device, cfg, score_head=score_head)
        if adapters:  # LoRA: the policy and the value model (its score head trained too) get adapters
            m = lora.apply(m, cfg, torch.bfloat16 if use_bf16 else None, train_head=bool(score_head))
        if check_like is not None and checkpoint.model_shape(m) != checkpoint.model_shape(check_like):
            raise ValueError(f"--ref_model {path}: its shape differs from the policy {model_dir}")
        return parallel.place(m, mesh, cfg, use_bf16, seq_len=capacity)

    model = load_placed(model_dir, adapters=True)
    ref_model = load_reference(cfg, cfg.ref_model or model_dir, model, load_placed)
    value_model = load_placed(cfg.value_model or model_dir, score_head=True, adapters=True) if cfg.algo == "ppo" \
        else None
    dp_rank, dp_world = parallel.dp_coords(mesh, rank, world)
    sampler = PromptSampler(len(tasks), cfg.prompts_per_step, dp_rank, dp_world, cfg.seed)
    trained, optimizer = trainables(model, value_model, cfg, device)
    ckpt_dir, step = checkpoint.resume(cfg, trained, optimizer, sampler, rank, world)
    if rank == 0:
        run.truncate_jsonl(os.path.join(cfg.output_dir, "eval.jsonl"), step)  # later steps are replayed

    os.makedirs(cfg.output_dir, exist_ok=True)
    if step == 0:
        held_out(model, tok, eval_rows, cfg, template, rank, 0)
    metrics = run.Metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), cfg.steps, rank, step, desc="rlvr",
                          report_to=cfg.report_to, config=vars(cfg))
    roll, sched = pick(RolloutParams, cfg), pick(UpdateSchedule, cfg)
    hp = pick(PPOParams, cfg) if cfg.algo == "ppo" else pick(GRPOParams, cfg)
    gen_seed = torch.Generator(device=device)
    while step < cfg.steps:
        t0 = time.perf_counter()
        idx = sampler.next()
        gen_seed.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
        group_prompts, outs = rollout(model, [prompts[i] for i in idx], roll, tok, gen_seed, mesh)
        t_gen = time.perf_counter() - t0
        scores, rew, finished, vstats = score(outs, [tasks[i] for i in idx], roll, tok)
        if step == 0 and rank == 0 and not any(scores):
            print("warning: every answer of the first rollout batch failed verification: no reward signal yet")
        if value_model is None:  # GRPO: group-normalised advantages
            adv, equal = group_advantages(rew, cfg.num_samples)
            keep = [i for i in range(len(outs)) if not (cfg.drop_equal_groups and equal[i // cfg.num_samples])]
            rows = build_rows(model, ref_model, group_prompts, outs, adv, keep, hp, capacity, tok.pad_token_id,
                              device, use_bf16, parallel.tp_group(mesh))
            t1 = time.perf_counter()
            loss_sums, grad_norm, lr = update(model, optimizer, rows, hp, sched, step, mesh, device, use_bf16)
        else:  # PPO: per-token rewards, values, GAE
            equal = torch.zeros(len(idx), dtype=torch.bool)
            rows = ppo_rows(model, ref_model, value_model, group_prompts, outs, rew, hp, capacity, tok.pad_token_id,
                            device, use_bf16, mesh)
            t1 = time.perf_counter()
            loss_sums, grad_norm, lr = ppo_update(model, value_model, optimizer, rows, hp, sched, step, mesh,
                                                  device, use_bf16)
        t_train = time.perf_counter() - t1
        step += 1

        metrics.log(step, step_metrics(loss_sums, rew, scores, outs, equal, finished, vstats, grad_norm, lr, t_gen,
                                       t_train, cfg, mesh, device), show=("reward", "accuracy", "kl", "response_len"))
        run.exit_if_asked(cfg, step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            held_out(model, tok, eval_rows, cfg, template, rank, step)
        checkpoint.save_if_due(cfg, ckpt_dir, step, cfg.steps, trained, optimizer, sampler, rank)
    metrics.close()
    final_acc = held_out(model, tok, eval_rows, cfg, template, rank, step)
    if value_model is not None:  # the value model too, as a reward-model checkpoint
        save_hf = lora.save_merged if lora.enabled(cfg) else checkpoint.save_hf  # LoRA: adapters folded in
        save_hf(value_model, os.path.join(cfg.output_dir, "final_value"), None if is_embedded else tok, template,
                rank=rank)
    return run.finish_run(cfg, model, is_embedded, tok, rank, finish, template), final_acc


def data_prompts(rows, tok, template):
    """Prompt token ids of each RLVR row: the chat template with the generation prompt."""
    return [tok.encode(data.render_chat(r["prompt_messages"], template, tok.eos_token, True, tok.bos_token))
            for r in rows]


if __name__ == "__main__":
    run.run_script(main)
