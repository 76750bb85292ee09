"""Supervised fine-tuning (Tulu 3 stage 1), run with torchrun or plain python.

    torchrun --nproc_per_node 1 nanotulu/train_sft.py          # embedded default: tiny model, synthetic data, CPU
    torchrun --nproc_per_node 8 nanotulu/train_sft.py --model /ckpt/Llama-3.1-8B --data tulu3_sft.jsonl:1.0 \
        --output_dir runs/sft-8b

Packed rows (no padding waste), assistant-only labels, Tulu 3's "sum" loss: each optimizer step's loss is
(sum of token cross-entropies) / (number of trained tokens in the whole step, over micro-batches and ranks), so
every token weighs the same whatever the micro-batching. The loss comes from the final hidden states through the
fused linear cross-entropy kernel: the logits never exist.
"""

import os
import time

import torch

from nanotulu import checkpoint, data, embedded, lora, parallel, run
from nanotulu.algos.sft import held_out_loss, sft_backward
from nanotulu.flags import TrainFlags, recipe, shared
from nanotulu.model import build_model, num_flops_per_token, resize_vocab


@recipe(output_dir="runs/sft", lr=5e-6, lr_schedule="linear", warmup_ratio=0.03, save_every=200,
        help=dict(model="HF model directory; empty: the embedded tiny Llama",
                  data="mix 'file[:amount],...' of SFT rows (amount: 0.5 = fraction, 500 = rows)",
                  eval_data="held-out mix, as --data: its loss logged as eval/loss",
                  micro_batch_rows="rows per forward/backward on each rank"))
class SFTConfig(TrainFlags, lora.LoRAFlags):  # LoRA: its flags
    """Supervised fine-tuning. Defaults are Tulu 3 8B's SFT recipe; with no --model the embedded tiny model and
    data are used with a preset suited to them."""
    max_seq_len: int = shared("max_seq_len", 4096, "row capacity in tokens; longer examples truncated")
    truncate: bool = shared("truncate", True)
    tokenize_workers: int = shared("tokenize_workers", 8)
    data_cache_dir: str = shared("data_cache_dir", "~/.cache/nanotulu/tokenized")
    epochs: int = shared("epochs", 2)
    max_steps: int = shared("max_steps", 0)
    batch_rows: int = shared("batch_rows", 16, "packed rows per optimizer step, all ranks (16 x 4096 tokens ~ "
                                               "Tulu's 128 sequences)")


# The embedded default: a tiny model learns the synthetic task in a few CPU minutes at a much higher lr.
EMBEDDED_PRESET = dict(max_seq_len=384, epochs=1, lr=1e-3, warmup_ratio=0.1, weight_decay=0.0, batch_rows=8,
                       save_every=100)


def embedded_sft_model(rank, out="runs/sft"):
    """The embedded DPO, reward model and RLVR start from the embedded SFT model: reused if out/final exists, else
    trained now (in this process). -> its directory."""
    model_dir = os.path.join(out, "final")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        if rank == 0:
            print(f"no {model_dir}: running the embedded SFT first")
        main(["--output_dir", out], finish=False)
    return model_dir


def load_data(cfg, is_embedded, tok, template, rank, mix=None):
    """Tokenized, masked SFT examples of the --data mix (the shipped synthetic set for the embedded default), or
    of `mix` (--eval_data)."""
    sources = data.parse_mix(mix or cfg.data) if (mix or cfg.data) else [(embedded.asset("sft.jsonl"), None)]
    examples, stats = data.load_sft_dataset(sources, tok, template, cfg.max_seq_len, truncate=cfg.truncate,
                                            seed=cfg.seed, workers=cfg.tokenize_workers, cache_dir=cfg.data_cache_dir)
    if rank == 0:
        print(f"{'held-out ' if mix else ''}data: {len(examples)} examples; {data.format_stats(stats)}")
    return examples


def main(argv=None, finish=True):
    cfg, is_embedded, rank, world, device, use_bf16 = run.start(SFTConfig, EMBEDDED_PRESET, argv, "SFT")
    if done := run.finished_run(cfg, rank, finish):  # a rerun of a finished run: its final/
        return done
    lora.check_flags(cfg)  # LoRA
    tok = data.load_tokenizer(cfg.tokenizer or ("byte" if is_embedded else cfg.model))
    template = data.resolve_template(cfg.template, tok)
    if rank == 0:
        print(data.describe_template(cfg.template, template, tok))
    examples = load_data(cfg, is_embedded, tok, template, rank)
    run.check_one_step([data.sft_length(e) for e in examples], cfg.max_seq_len, cfg, world)
    eval_examples = load_data(cfg, is_embedded, tok, template, rank, mix=cfg.eval_data) if cfg.eval_data else []
    if cfg.eval_data and not eval_examples:
        raise ValueError(f"--eval_data {cfg.eval_data}: no held-out example left")

    # --- model, placed on the (dp, tp) mesh ---------------------------------------------------------------------
    if is_embedded:
        model = build_model(embedded.EMBEDDED_MODEL, device=device, seed=cfg.seed, attn_backend=cfg.attn_backend)
        resize_vocab(model, max(tok.vocab_size, model.cfg.vocab_size))
    else:
        model = run.load_model(cfg.model, tok, device, cfg)
    model = lora.apply(model, cfg, base_dtype=torch.bfloat16 if use_bf16 else None)  # LoRA: adapters, frozen base
    mesh = parallel.make_mesh(cfg, world, device)
    model = parallel.place(model, mesh, cfg, use_bf16, seq_len=cfg.max_seq_len)
    dp_rank, dp_world = parallel.dp_coords(mesh, rank, world)

    # --- packed loader, optimizer, resume ---------------------------------------------------------------------------
    loader = data.PackedLoader(examples, capacity=cfg.max_seq_len, rows_per_step=cfg.batch_rows // dp_world,
                               rank=dp_rank, world_size=dp_world, seed=cfg.seed, pad_id=tok.pad_token_id)
    total_steps = cfg.max_steps or cfg.epochs * len(loader)
    eval_rows = data.held_out_rows(eval_examples, cfg.max_seq_len, dp_rank, dp_world, tok.pad_token_id) \
        if eval_examples else None
    optimizer = run.make_optimizer(model, cfg, device)
    ckpt_dir, step = checkpoint.resume(cfg, model, optimizer, loader, rank, world)

    # --- training: one optimizer step per loader step ---------------------------------------------------------------
    metrics = run.Metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), total_steps, rank, step, desc="sft",
                          report_to=cfg.report_to, config=vars(cfg))
    tokens_per_step = cfg.batch_rows * cfg.max_seq_len  # row capacity, padding included (packing wastes ~1%)
    speed = run.Speed(device, num_flops_per_token(model.cfg, cfg.max_seq_len), tokens_per_step, world)
    batches = run.step_batches(loader)
    model.train()
    while step < total_steps:
        micro = data.micro_batches(next(batches), cfg.micro_batch_rows, device)
        loss_sum, n_tokens = sft_backward(model, micro, cfg.loss_impl, mesh, use_bf16)
        lr = run.lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
        grad_norm = run.optimizer_step(model, optimizer, lr, cfg.max_grad_norm)
        step += 1
        loss = parallel.all_reduce_sum(loss_sum, parallel.dp_group(mesh)) / n_tokens.clamp(min=1)
        run.exit_if_asked(cfg, step)
        row = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens, "epoch": loader.epoch,
               **speed.tick()}
        if eval_rows is not None and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            row["eval/loss"] = held_out_loss(model, eval_rows, cfg.micro_batch_rows, device, cfg.loss_impl, mesh,
                                             use_bf16)
            speed.t = time.perf_counter()  # the evaluation is not training time
        metrics.log(step, row, show=("loss", "eval/loss", "lr", "tok/s"))
        checkpoint.save_if_due(cfg, ckpt_dir, step, total_steps, model, optimizer, loader, rank)
    metrics.close()
    return run.finish_run(cfg, model, is_embedded, tok, rank, finish, template)


if __name__ == "__main__":
    run.run_script(main)
