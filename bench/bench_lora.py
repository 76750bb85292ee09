"""Full fine-tuning, LoRA and QLoRA side by side (nanotulu/lora.py).

    python bench/bench_lora.py memory              # trainable params and training memory: Llama-3.1-8B (computed)
                                                   # and the embedded model (measured off its tensors)
    python bench/bench_lora.py sft [--out DIR]     # the embedded SFT stage: full vs --lora vs --quantize nf4,
                                                   # held-out accuracy and train time of each
    python bench/bench_lora.py memory --cpu-smoke  # the tables only (no training): what CI runs

Memory is weights + gradients + AdamW state as nanotulu trains: full fine-tuning keeps fp32 master weights (4 B
each) with fp32 gradients and two fp32 moments; LoRA keeps the frozen base in bf16 (2 B: a weight that never
changes needs no fp32 master copy) and fp32 adapters with their gradients and moments; QLoRA holds every block
projection in NF4 (0.5 B + one int8 scale per 64 weights + one fp32 second-level scale per 64 x 256) and the
embeddings and norms in bf16. Activations are left out: they depend on the batch, not on the method (LoRA adds
the (tokens, r) activations of each adapter).
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import time
import types

import torch

from nanotulu import embedded, lora
from nanotulu.model import LlamaConfig, build_model

EMBEDDED_SFT_LR = 1e-3  # the embedded SFT preset's lr (train_sft.EMBEDDED_PRESET); LoRA takes --lr_scale x this

LLAMA_3_1_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)


def gib(b):
    return f"{b / 2**30:.2f} GiB"


def mib(b):
    return f"{b / 2**20:.2f} MiB"


def lora_flags(mode, rank, alpha):
    return types.SimpleNamespace(lora=True, lora_rank=rank, lora_alpha=alpha, lora_dropout=0.1,
                                 lora_targets="q,k,v,o,gate,up,down", quantize="nf4" if mode == "qlora" else "",
                                 lora_adapter="", seed=0, tp=1, dp_shard=-1)


def tensor_bytes(t):
    if lora.is_nf4(t):  # the packed codes and scales it holds, not its logical (float) size
        return sum(x.numel() * x.element_size() for x in (t.quantized_data, t.quantized_scalers,
                                                           t.quantization_factor, t.scaler_mean, t.nf4))
    return t.numel() * t.element_size()


def measured_step_memory(model):
    """One SFT step (fused loss) and one AdamW step on a packed row; then the bytes actually held."""
    from nanotulu import data
    from nanotulu.algos.sft import sft_backward

    tok = data.load_tokenizer("byte")
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}]
    row = data.make_row([data.tokenize_sft(chat, tok)], 64, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sft_backward(model, [data.stack_rows([row], "cpu")], impl="torch")
    opt.step()
    weights = sum(tensor_bytes(p) for p in model.parameters())
    grads = sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(tensor_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    return {"weights": weights, "grads": grads, "optimizer": state, "total": weights + grads + state}


def memory_tables(rank=64, alpha=16.0):
    lines = [f"Llama-3.1-8B, computed (lora.shape_memory), rank {rank} on q,k,v,o,gate,up,down:", "",
             "| method | trainable params | weights | gradients | AdamW state | total |", "|---|---|---|---|---|---|"]
    for mode in ("full", "lora", "qlora"):
        m = lora.shape_memory(LLAMA_3_1_8B, mode, rank=rank)
        total = m["weights"] + m["grads"] + m["optimizer"]
        lines.append(f"| {mode} | {m['trainable'] / 1e6:,.1f} M ({100 * m['trainable'] / m['total']:.2f}%) | "
                     f"{gib(m['weights'])} | {gib(m['grads'])} | {gib(m['optimizer'])} | {gib(total)} |")
    cfg = dataclasses.replace(embedded.EMBEDDED_MODEL)
    lines += ["", f"embedded model (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, byte vocabulary), "
              f"measured after one SFT step with AdamW as the CPU runs train it (frozen base in fp32 there: CPU "
              f"runs are fp32): bytes of the parameters, of the .grad tensors and of the optimizer's state, rank "
              f"{rank}:", "",
              "| method | trainable params | weights | gradients | AdamW state | total |", "|---|---|---|---|---|---|"]
    for mode in ("full", "lora", "qlora"):
        model = build_model(cfg, seed=0)
        if mode != "full":
            lora.apply(model, lora_flags(mode, rank, alpha))
        trainable, total_params = lora.count_params(model)
        m = measured_step_memory(model)
        lines.append(f"| {mode} | {trainable:,} ({100 * trainable / total_params:.1f}%) | {mib(m['weights'])} | "
                     f"{mib(m['grads'])} | {mib(m['optimizer'])} | {mib(m['total'])} |")
    return "\n".join(lines)


def sft_variants(out, rank, alpha, lr_scale, only, max_steps=0, batch_rows=0):
    """The embedded SFT (its preset) as full fine-tuning, LoRA and QLoRA; held-out accuracy of each final/ (the
    pipeline's evaluation: greedy, 200 prompts of rlvr_test.jsonl)."""
    from nanotulu import data
    from nanotulu.eval import EMBEDDED_MAX_NEW_TOKENS, evaluate
    from nanotulu.model import Llama
    from nanotulu.rewards import load_rlvr_rows

    rows = load_rlvr_rows(embedded.asset("rlvr_test.jsonl"))
    lr = EMBEDDED_SFT_LR
    variants = {"full": [], "lora": ["--lora", "true", "--lora_rank", str(rank), "--lora_alpha", str(alpha),
                                     "--lr", str(lr * lr_scale)],
                "qlora": ["--quantize", "nf4", "--lora_rank", str(rank), "--lora_alpha", str(alpha),
                          "--lr", str(lr * lr_scale)]}
    results = []
    for name, flags in variants.items():
        if only and name not in only:
            continue
        d = os.path.join(out, name)
        t = time.perf_counter()
        steps = (["--max_steps", str(max_steps)] if max_steps else []) + \
            (["--batch_rows", str(batch_rows)] if batch_rows else [])
        # the trainer as a user runs it (bench/ never imports a script)
        subprocess.run([sys.executable, "-m", "nanotulu.train_sft", "--output_dir", d, "--resume", "false", *steps,
                        *flags], check=True)
        dt = time.perf_counter() - t
        # the pipeline's held-out evaluation: greedy, the byte tokenizer, the embedded answer length
        model = Llama.from_pretrained(os.path.join(d, "final"), dtype=torch.float32)
        res = evaluate(model, data.load_tokenizer("byte"), rows, batch_size=256,
                       max_new_tokens=EMBEDDED_MAX_NEW_TOKENS, progress=False)
        acc, per = res["overall"]["score"], {k: v["score"] for k, v in res["datasets"].items()}
        line = f"| {name} | {' '.join(steps + flags) or '(preset)'} | {acc:.3f} | " + \
               " | ".join(f"{per[k]:.3f}" for k in sorted(per)) + f" | {dt:.0f} s |"
        print(line, flush=True)
        results.append(line)
        with open(os.path.join(out, "results.md"), "a") as f:
            f.write(line + "\n")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("memory", "sft"))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr_scale", type=float, default=5.0, help="LoRA lr = this x the full preset's (Tülu 2: QLoRA "
                   "1e-4 vs full 2e-5)")
    p.add_argument("--only", default="", help="comma-separated subset of full,lora,qlora")
    p.add_argument("--out", default="runs/lora_bench")
    p.add_argument("--max_steps", type=int, default=0, help="stop the SFT after this many steps (0: the preset's "
                   "one epoch)")
    p.add_argument("--batch_rows", type=int, default=0, help="rows per step (0: the preset's 8)")
    p.add_argument("--cpu-smoke", action="store_true", help="the memory tables only")
    a = p.parse_args(argv)
    if a.what == "memory" or a.cpu_smoke:
        print(memory_tables(a.rank, a.alpha))
        return
    os.makedirs(a.out, exist_ok=True)
    sft_variants(a.out, a.rank, a.alpha, a.lr_scale, [s for s in a.only.split(",") if s], a.max_steps,
                 a.batch_rows)


if __name__ == "__main__":
    sys.exit(main())
