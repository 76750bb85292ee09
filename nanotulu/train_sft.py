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
from dataclasses import dataclass, field

import torch

from nanotulu import checkpoint, common, data, embedded, lora, losses
from nanotulu.data import TEMPLATE_HELP
from nanotulu.model import build_model, num_flops_per_token, resize_vocab


@dataclass
class SFTConfig(lora.LoRAFlags, common.RunFlags):  # LoRA: its flags
    """Supervised fine-tuning. Defaults are Tulu 3 8B's SFT recipe; with no --model the embedded tiny model and
    data are used with a preset suited to them."""
    model: str = field(default="", metadata={"help": "HF model directory; empty: the embedded tiny Llama"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer directory or 'byte'; empty: the model's"})
    data: str = field(default="", metadata={"help": "mix 'file[:amount],...' (amount: 0.5 = fraction, 500 = rows)"})
    template: str = field(default="tulu", metadata={"help": TEMPLATE_HELP})
    eval_data: str = field(default="", metadata={"help": "held-out mix, as --data: its loss logged as eval/loss"})
    eval_every: int = field(default=0, metadata={"help": "held-out loss every N steps and at the end (0: at the end)"})
    output_dir: str = "runs/sft"
    max_seq_len: int = field(default=4096, metadata={"help": "row capacity in tokens; longer examples truncated"})
    truncate: bool = field(default=True, metadata={"help": "truncate over-long examples (false: drop them)"})
    tokenize_workers: int = field(default=8, metadata={"help": "processes tokenizing the data (0/1: in-process)"})
    data_cache_dir: str = field(default="~/.cache/nanotulu/tokenized", metadata={
        "help": "tokenized-data cache shared by runs and ranks (must be shared by all nodes; '': none)"})
    epochs: int = 2
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: epochs)"})
    lr: float = 5e-6
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.03
    batch_rows: int = field(default=16, metadata={"help": "packed rows per optimizer step, all ranks (16 x 4096 "
                                                          "tokens ~ Tulu's 128 sequences)"})
    micro_batch_rows: int = field(default=1, metadata={"help": "rows per forward/backward on each rank"})
    save_every: int = field(default=200, metadata={"help": "resumable checkpoint every N steps (0: never)"})


# The embedded default: a tiny model learns the synthetic task in a few CPU minutes at a much higher lr.
EMBEDDED_PRESET = dict(max_seq_len=384, epochs=1, lr=1e-3, warmup_ratio=0.1, weight_decay=0.0, batch_rows=8,
                       save_every=100)


def sft_backward(model, micro, impl="auto", mesh=None, use_bf16=False):
    """Forward and backward over one optimizer step's micro-batches with Tulu 3's "sum" loss: each token's loss is
    divided by the number of trained tokens in the whole step (all micro-batches, all data-parallel ranks), which
    is counted before any backward. Leaves the step's gradient in .grad; returns (summed token loss of this rank,
    trained tokens of the step)."""
    dp_world = 1 if mesh is None else mesh["dp"].size()
    device = micro[0]["input_ids"].device
    n_tokens = common.all_reduce_sum(sum((m["targets"] != -100).sum() for m in micro).float(), common.dp_group(mesh))
    loss_sum = torch.zeros((), device=device)
    for m in common.grad_sync_on_last(model, micro):
        head = losses.loss_head("cross_entropy_sum", m["targets"], impl, common.tp_group(mesh))
        with common.precision(model, use_bf16):
            token_loss = model(m["input_ids"], m["position_ids"], m["cu_seqlens"], head=head,
                               max_seqlen=m.get("max_seqlen"))
        # x dp_world: data-parallel gradient reduction averages over ranks, the "sum" loss wants their sum
        (token_loss * dp_world / n_tokens.clamp(min=1)).backward()
        loss_sum += token_loss.detach()
    return loss_sum, n_tokens


@torch.no_grad()
def held_out_loss(model, rows, micro_batch_rows, device, impl="auto", mesh=None, use_bf16=False):
    """Mean token cross-entropy over the held-out rows of every data-parallel rank (data.held_out_rows)."""
    sums = torch.zeros(2, device=device)  # summed token loss, trained tokens
    for m in data.micro_batches(rows, micro_batch_rows, device):
        head = losses.loss_head("cross_entropy_sum", m["targets"], impl, common.tp_group(mesh))
        with common.precision(model, use_bf16):
            sums[0] += model(m["input_ids"], m["position_ids"], m["cu_seqlens"], head=head,
                             max_seqlen=m.get("max_seqlen")).float()
        sums[1] += (m["targets"] != -100).sum()
    sums = common.all_reduce_sum(sums, common.dp_group(mesh))
    return sums[0] / sums[1].clamp(min=1)


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
    cfg, is_embedded, rank, world, device, use_bf16 = common.start(SFTConfig, EMBEDDED_PRESET, argv, "SFT")
    lora.check_flags(cfg)  # LoRA
    tok = data.load_tokenizer(cfg.tokenizer or ("byte" if is_embedded else cfg.model))
    template = data.resolve_template(cfg.template, tok)
    examples = load_data(cfg, is_embedded, tok, template, rank)
    common.check_one_step([data.sft_length(e) for e in examples], cfg.max_seq_len, cfg, world)
    eval_examples = load_data(cfg, is_embedded, tok, template, rank, mix=cfg.eval_data) if cfg.eval_data else []
    if cfg.eval_data and not eval_examples:
        raise ValueError(f"--eval_data {cfg.eval_data}: no held-out example left")

    # --- model, placed on the (dp, tp) mesh ---------------------------------------------------------------------
    if is_embedded:
        model = build_model(embedded.EMBEDDED_MODEL, device=device, seed=cfg.seed, attn_backend=cfg.attn_backend)
        resize_vocab(model, max(tok.vocab_size, model.cfg.vocab_size))
    else:
        model = common.load_model(cfg.model, tok, device, cfg)
    model = lora.apply(model, cfg, base_dtype=torch.bfloat16 if use_bf16 else None)  # LoRA: adapters, frozen base
    mesh = common.make_mesh(cfg, world, device)
    model = common.place(model, mesh, cfg, use_bf16, seq_len=cfg.max_seq_len)
    dp_rank, dp_world = common.dp_coords(mesh, rank, world)

    # --- packed loader, optimizer, resume ---------------------------------------------------------------------------
    loader = data.PackedLoader(examples, capacity=cfg.max_seq_len, rows_per_step=cfg.batch_rows // dp_world,
                               rank=dp_rank, world_size=dp_world, seed=cfg.seed, pad_id=tok.pad_token_id)
    total_steps = cfg.max_steps or cfg.epochs * len(loader)
    eval_rows = data.held_out_rows(eval_examples, cfg.max_seq_len, dp_rank, dp_world, tok.pad_token_id) \
        if eval_examples else None
    optimizer = common.make_optimizer(model, cfg, device)
    ckpt_dir, step = checkpoint.resume(cfg, model, optimizer, loader, rank, world)

    # --- training: one optimizer step per loader step ---------------------------------------------------------------
    metrics = common.Metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), total_steps, rank, step, desc="sft",
                             report_to=cfg.report_to, config=vars(cfg))
    tokens_per_step = cfg.batch_rows * cfg.max_seq_len  # row capacity, padding included (packing wastes ~1%)
    speed = common.Speed(device, num_flops_per_token(model.cfg, cfg.max_seq_len), tokens_per_step, world)
    batches = common.step_batches(loader)
    model.train()
    while step < total_steps:
        micro = data.micro_batches(next(batches), cfg.micro_batch_rows, device)
        loss_sum, n_tokens = sft_backward(model, micro, cfg.loss_impl, mesh, use_bf16)
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
        grad_norm = common.optimizer_step(model, optimizer, lr, cfg.max_grad_norm)
        step += 1
        loss = common.all_reduce_sum(loss_sum, common.dp_group(mesh)) / n_tokens.clamp(min=1)
        common.exit_if_asked(cfg, step)
        row = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens, "epoch": loader.epoch,
               **speed.tick()}
        if eval_rows is not None and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            row["eval/loss"] = held_out_loss(model, eval_rows, cfg.micro_batch_rows, device, cfg.loss_impl, mesh,
                                             use_bf16)
            speed.t = time.perf_counter()  # the evaluation is not training time
        metrics.log(step, row, show=("loss", "eval/loss", "lr", "tok/s"))
        checkpoint.save_if_due(cfg, ckpt_dir, step, total_steps, model, optimizer, loader, rank)
    metrics.close()
    finish_run = lora.finish_run if lora.enabled(cfg) else common.finish_run  # LoRA: adapter (+ merged) export
    return finish_run(cfg, model, is_embedded, tok, rank, finish, template)


if __name__ == "__main__":
    main()
