"""Direct preference optimisation (Tulu 3 stage 2), run with torchrun or plain python.

    torchrun --nproc_per_node 1 nanotulu/train_dpo.py        # embedded default: after the embedded SFT, on CPU
    torchrun --nproc_per_node 8 nanotulu/train_dpo.py --model runs/sft-8b/final --data prefs.jsonl \
        --output_dir runs/dpo-8b

Each preference pair (chosen and rejected answers to one prompt) is one item of the packed loader: both sequences
land in the same row, as two documents of its cu_seqlens. The fused kernel gives per-token log-probs of the
answer tokens (prompt tokens masked), summed per document into sequence log-probs. Reference log-probs are
computed once, before training, in a no-grad pass, and cached on disk under a hash of everything they depend on,
so no reference model is held in memory while training (or --ref_mode online keeps one). The algorithm is in
algos/dpo.py, the pair data in pairs.py; this script holds the flags, the data, the reference side and the loop.
"""

import os
import time
from dataclasses import field

import torch

from nanotulu import checkpoint, data, embedded, lora, parallel, run
from nanotulu.algos.dpo import (DPO_SUMS, LOSS_TYPES, DPOParams, compute_ref_logps, dpo_backward, file_fingerprint,
                                held_out_metrics, load_or_compute_ref, pair_logps, ref_cache_key)
from nanotulu.flags import TrainFlags, pick, recipe, shared
from nanotulu.model import num_flops_per_token
from nanotulu.pairs import load_pairs, pair_docs, pair_hashes, pair_length
from nanotulu.train_sft import embedded_sft_model


@recipe(output_dir="runs/dpo", lr=5e-7, lr_schedule="linear", warmup_ratio=0.1, save_every=200,
        help=dict(model="HF directory of the SFT model; empty: the embedded one",
                  data="mix 'file[:amount],...' of chosen/rejected rows",
                  eval_data="held-out mix, as --data: reward accuracy and margin logged as eval/...",
                  eval_every="held-out metrics every N steps and at the end (0: at the end)"))
class DPOConfig(TrainFlags, lora.LoRAFlags):  # LoRA: its flags
    """Preference tuning. Defaults are Tulu 3 8B's DPO recipe; with no --model the embedded SFT model and the
    shipped synthetic preference set are used with a preset suited to them."""
    ref_model: str = shared("ref_model", "")
    loss_type: str = field(default="dpo_norm", metadata={"help": "dpo | dpo_norm | simpo | ipo"})
    beta: float = shared("beta", 5.0)
    gamma_beta_ratio: float = field(default=0.3, metadata={"help": "SimPO: target reward margin / beta"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO: assumed share of flipped "
                                                                  "preference labels"})
    max_seq_len: int = shared("max_seq_len", 2048, "per sequence; a row holds 2 x this many tokens")
    truncate: bool = shared("truncate", True, "cut over-long answers (false: drop the pair)")
    epochs: int = shared("epochs", 1)
    max_steps: int = shared("max_steps", 0)
    batch_pairs: int = field(default=128, metadata={"help": "preference pairs per optimizer step, all ranks "
                                                            "(packed into as many rows as they need)"})
    ref_mode: str = field(default="cached", metadata={"help": "cached (one no-grad pass, on disk) | online"})
    ref_cache_dir: str = field(default="~/.cache/nanotulu/ref_logps", metadata={"help": "reference cache folder"})
    tokenize_workers: int = shared("tokenize_workers", 8)
    data_cache_dir: str = shared("data_cache_dir", "~/.cache/nanotulu/tokenized")


EMBEDDED_PRESET = dict(max_seq_len=256, lr=3e-6, beta=5.0, batch_pairs=8, save_every=50, epochs=1,
                       ref_cache_dir="runs/ref_cache")


def check_flags(cfg):
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type {cfg.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if cfg.ref_mode not in ("cached", "online"):
        raise ValueError(f"--ref_mode {cfg.ref_mode!r}: expected cached or online")


def check_one_step(pairs, cfg, world):
    """Before any model loads: the pairs fill at least one optimizer step of --batch_pairs, which every
    data-parallel rank can share."""
    dp = run.planned_dp_world(cfg, world)
    if cfg.batch_pairs < dp:
        raise ValueError(f"--batch_pairs {cfg.batch_pairs}: fewer pairs per step than data-parallel ranks ({dp}): "
                         "raise --batch_pairs")
    if len(pairs) < cfg.batch_pairs:
        raise ValueError(f"{len(pairs)} pairs: fewer than one step of --batch_pairs {cfg.batch_pairs}: lower "
                         f"--batch_pairs (to {len(pairs)} at most), or add data")


def load_data(cfg, is_embedded, tok, template, rank, mix=None):
    """Preference pairs of the --data mix (the shipped synthetic set for the embedded default), or of `mix`."""
    sources = data.parse_mix(mix or cfg.data) if (mix or cfg.data) else [(embedded.asset("dpo.jsonl"), None)]
    pairs, stats = load_pairs(sources, tok, template, cfg.max_seq_len, cfg.truncate, cfg.seed, cfg.tokenize_workers,
                              cfg.data_cache_dir)
    if rank == 0:
        print(f"{'held-out ' if mix else ''}data: {stats['pairs']} pairs of {stats['rows']} rows; truncated "
              f"{stats['truncated']}, dropped too "
              f"long {stats['dropped_too_long']}")
    if not pairs:
        raise ValueError("no preference pairs left to train on")
    return pairs


def reference(cfg, ref_dir, pair_sets, template, tok, load_placed, mesh, device, use_bf16, rank, world, tag=""):
    """The reference side of the loss, before the policy exists (the two are never in memory together):
    -> (ref_model, ref_tables): the frozen model for --ref_mode online, else for each list of pairs in pair_sets
    (training pairs, held-out pairs) the (P, 2) table of cached reference log-likelihoods (computed in one no-grad
    pass on a cache miss, the reference model loaded at most once); (None, None) for simpo."""
    if cfg.loss_type == "simpo":
        return None, [None] * len(pair_sets)
    if cfg.ref_mode == "online":
        ref_model = load_placed(ref_dir).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
        return ref_model, [None] * len(pair_sets)
    fingerprint = file_fingerprint(ref_dir) + tag  # tag: a LoRA run's NF4 base or starting adapter
    dp_rank, dp_world = parallel.dp_coords(mesh, rank, world)
    loaded = []
    tables = []
    for pairs in pair_sets:
        if not pairs:  # no held-out set
            tables.append(None)
            continue
        hashes = pair_hashes(pairs)
        key = ref_cache_key(fingerprint, hashes, cfg.max_seq_len, cfg.loss_type, template)

        def compute(pairs=pairs):
            if not loaded:
                loaded.append(load_placed(ref_dir))
            return compute_ref_logps(loaded[0], pairs, 2 * cfg.max_seq_len, tok.pad_token_id, device, cfg.loss_impl,
                                     dp_rank, dp_world, cfg.micro_batch_rows, parallel.tp_group(mesh),
                                     parallel.dp_group(mesh), use_bf16)

        table, _, _ = load_or_compute_ref(cfg.ref_cache_dir, key, hashes, compute, rank, device)
        tables.append(table.to(device))
    loaded.clear()  # the reference model is freed before the policy is loaded
    return None, tables


def main(argv=None, finish=True):
    cfg, is_embedded, rank, world, device, use_bf16 = run.start(DPOConfig, EMBEDDED_PRESET, argv, "preference")
    if done := run.finished_run(cfg, rank, finish):  # a rerun of a finished run: its final/
        return done
    check_flags(cfg)
    lora.check_flags(cfg)  # LoRA
    tok = data.load_tokenizer(cfg.tokenizer or ("byte" if is_embedded else cfg.model))
    template = data.resolve_template(cfg.template, tok)  # a bad --template fails before any work
    if rank == 0:
        print(data.describe_template(cfg.template, template, tok))
    pairs = load_data(cfg, is_embedded, tok, template, rank)
    eval_pairs = load_data(cfg, is_embedded, tok, template, rank, mix=cfg.eval_data) if cfg.eval_data else []
    capacity = 2 * cfg.max_seq_len  # a row holds at least one whole pair
    check_one_step(pairs, cfg, world)  # before the embedded SFT and the reference pass
    model_dir = embedded_sft_model(rank) if is_embedded else cfg.model
    mesh = parallel.make_mesh(cfg, world, device)

    def load_placed(path):
        m = lora.apply(run.load_model(path, tok, device, cfg), cfg, torch.bfloat16 if use_bf16 else None)  # LoRA
        return parallel.place(m, mesh, cfg, use_bf16, seq_len=capacity)

    # --- reference log-probs, then the policy -----------------------------------------------------------------------
    if lora.enabled(cfg):  # LoRA: the policy first; its reference is itself with the adapters off (no second model)
        model = load_placed(model_dir)
        ref_model, (ref_table, eval_ref_table) = lora.dpo_reference(cfg, model, reference, file_fingerprint, dict(
            ref_dir=model_dir, pair_sets=[pairs, eval_pairs], template=template, tok=tok, mesh=mesh, device=device,
            use_bf16=use_bf16, rank=rank, world=world))
    else:
        ref_model, (ref_table, eval_ref_table) = reference(cfg, cfg.ref_model or model_dir, [pairs, eval_pairs],
                                                           template, tok, load_placed, mesh, device, use_bf16, rank,
                                                           world)
        model = load_placed(model_dir)

    def ref_logps(m, table=None):  # (P, 2) reference log-likelihoods of a micro-batch's pairs, or None (simpo)
        table = ref_table if table is None else table
        if ref_model is not None:
            with torch.no_grad(), parallel.precision(ref_model, use_bf16), lora.adapters_off(ref_model):  # LoRA
                return pair_logps(ref_model, m, cfg.loss_impl, parallel.tp_group(mesh))[0].float()
        return None if table is None else table[m["pair_ids"]]

    # --- packed loader of pairs, optimizer, resume ------------------------------------------------------------------
    dp_rank, dp_world = parallel.dp_coords(mesh, rank, world)
    # exactly --batch_pairs pairs per step over all ranks (RECIPE: 128), packed into as many rows as they take
    loader = data.CountedLoader(pairs, cfg.batch_pairs, capacity, rank=dp_rank, world_size=dp_world, seed=cfg.seed,
                                pad_id=tok.pad_token_id, length_fn=pair_length, to_docs=pair_docs)
    total_steps = cfg.max_steps or cfg.epochs * len(loader)
    eval_rows = data.held_out_rows(eval_pairs, capacity, dp_rank, dp_world, tok.pad_token_id, pair_length,
                                   pair_docs) if eval_pairs else None
    optimizer = run.make_optimizer(model, cfg, device)
    ckpt_dir, step = checkpoint.resume(cfg, model, optimizer, loader, rank, world)

    # --- training ---------------------------------------------------------------------------------------------------
    hp = pick(DPOParams, cfg)
    metrics = run.Metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), total_steps, rank, step, desc="dpo",
                          report_to=cfg.report_to, config=vars(cfg))
    speed = run.Speed(device, num_flops_per_token(model.cfg, capacity), 0, world)
    batches = run.step_batches(loader)
    model.train()
    while step < total_steps:
        rows = next(batches)
        speed.tokens = len(rows) * dp_world * capacity  # rows per step vary with the pairs' lengths (padding counted)
        micro = data.micro_batches(rows, cfg.micro_batch_rows, device, stack=data.stack_pair_rows)
        sums, n_pairs = dpo_backward(model, micro, ref_logps, hp, cfg.loss_impl, mesh, use_bf16)
        lr = run.lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
        grad_norm = run.optimizer_step(model, optimizer, lr, cfg.max_grad_norm)
        step += 1
        mean = dict(zip(DPO_SUMS, parallel.all_reduce_sum(sums, parallel.dp_group(mesh)) / n_pairs))
        run.exit_if_asked(cfg, step)
        mean.pop("answer_tokens")
        row = {**mean, "rewards/margin": mean["rewards/chosen"] - mean["rewards/rejected"], "lr": lr,
               "grad_norm": grad_norm, "pairs": n_pairs, **speed.tick()}
        if eval_rows is not None and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            row.update(held_out_metrics(model, eval_rows, lambda m: ref_logps(m, eval_ref_table), hp,
                                        cfg.micro_batch_rows, device, cfg.loss_impl, mesh, use_bf16))
            speed.t = time.perf_counter()  # the evaluation is not training time
        metrics.log(step, row, show=("loss", "rewards/accuracy", "rewards/margin", "eval/rewards/accuracy", "tok/s"))
        checkpoint.save_if_due(cfg, ckpt_dir, step, total_steps, model, optimizer, loader, rank)
    metrics.close()
    return run.finish_run(cfg, model, is_embedded, tok, rank, finish, template)


if __name__ == "__main__":
    run.run_script(main)
