"""The whole Tulu 3 recipe on the embedded default: SFT -> DPO -> RLVR, with held-out accuracy after each stage.

    python -m nanotulu.pipeline            # CPU, the embedded tiny model and synthetic verifiable tasks
    python -m nanotulu.pipeline --rl both  # RLVR by GRPO and by PPO (a value model), both from the DPO model

Writes runs/pipeline/{sft,dpo,rlvr,ppo}/ (metrics.jsonl, checkpoints, final HF model), runs/pipeline/summary.md (the
accuracy table) and runs/pipeline/curves.png (each stage's training curves and the accuracy per stage).
"""

import argparse
import dataclasses
import json
import os
import time

import torch

from nanotulu import data, embedded, rewards, run, train_dpo, train_rlvr, train_sft
from nanotulu.flags import resolve_flags
from nanotulu.eval import EMBEDDED_MAX_NEW_TOKENS
from nanotulu.model import Llama, build_model


def preset_flags(preset):
    return [x for k, v in preset.items() for x in (f"--{k}", str(v))]


def held_out_accuracy(model_dir, rows, max_new_tokens, seed=0):
    from nanotulu.eval import evaluate

    tok = data.load_tokenizer("byte")
    if model_dir is None:  # the untrained embedded model
        model = build_model(embedded.EMBEDDED_MODEL, seed=seed)
    else:
        model = Llama.from_pretrained(model_dir, dtype=torch.float32)
    res = evaluate(model, tok, rows, batch_size=256, max_new_tokens=max_new_tokens, progress=False)
    return res["overall"]["score"], {k: v["score"] for k, v in res["datasets"].items()}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def smooth(values, window=10):
    """Trailing moving average: the per-step DPO/RLVR metrics come from few pairs/prompts and are noisy."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def curve(ax, rows, key, label, color):
    steps, values = [r["step"] for r in rows], [r[key] for r in rows]
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth(values), color=color, label=f"{label} (moving avg)")


def plot(out_dir, table):
    matplotlib = data.optional_import("matplotlib", "plot", "the pipeline's curves.png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    sft = read_jsonl(os.path.join(out_dir, "sft", "metrics.jsonl"))
    ax[0, 0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    ax[0, 0].set(title="SFT: loss (sum semantics)", xlabel="step", ylabel="loss")
    dpo = read_jsonl(os.path.join(out_dir, "dpo", "metrics.jsonl"))
    curve(ax[0, 1], dpo, "loss", "loss", "C0")
    curve(ax[0, 1], dpo, "rewards/accuracy", "rewards/accuracy", "C1")
    ax[0, 1].set(title="DPO (dpo_norm)", xlabel="step")
    ax[0, 1].legend()
    for stage, label, color in (("rlvr", "GRPO", "C2"), ("ppo", "PPO", "C3")):
        if any(t[0] == stage for t in table):
            rl = read_jsonl(os.path.join(out_dir, stage, "metrics.jsonl"))
            curve(ax[1, 0], rl, "score", f"{label}: rollout verifier score", color)
    ax[1, 0].set(title="RLVR", xlabel="step")
    ax[1, 0].legend()
    names = [t[0] for t in table]
    ax[1, 1].bar(names, [t[1] for t in table], color=["grey", "C0", "C1", "C2", "C3"][:len(names)])
    for i, t in enumerate(table):
        ax[1, 1].text(i, t[1], f"{t[1]:.3f}", ha="center", va="bottom")
    ax[1, 1].set(title="held-out verified accuracy after each stage", ylim=(0, 1))
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=100)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanotulu.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/pipeline", help="stage outputs and the summary (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="rerun every stage from scratch (default: off: a stage whose "
                   "final/ exists and was trained with the same flags is reused; one with other flags is refused)")
    p.add_argument("--threads", type=int, default=run.EMBEDDED_THREADS, help="CPU threads; results depend on it "
                   "(float sums split differently): README's table is for the default (default: %(default)s)")
    p.add_argument("--rl", default="grpo", choices=("grpo", "ppo", "both"), help="the RLVR stage: GRPO (stage "
                   "'rlvr'), PPO with a value model (stage 'ppo'), or both from the same DPO model (default: "
                   "%(default)s)")
    p.add_argument("--lora", action="store_true", help="every stage trains LoRA adapters (nanotulu/lora.py's "
                   "defaults: rank 64, alpha 16, dropout 0.1 on q,k,v,o,gate,up,down) at --lora_lr_scale x its "
                   "preset's lr, merged into its final/ for the next stage (default: off: full fine-tuning)")
    p.add_argument("--quantize", default="", choices=("", "nf4"), help="nf4: QLoRA, each stage's frozen base in 4-bit "
                   "NF4 (implies --lora) (default: '': full-precision base)")
    p.add_argument("--lora_lr_scale", type=float, default=5.0, help="LoRA lr / full lr (Tülu 2: QLoRA 1e-4 beside "
                   "full 2e-5) (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.output_dir
    t0 = time.perf_counter()
    test_rows = rewards.load_rlvr_rows(embedded.asset("rlvr_test.jsonl"))
    eval_tokens = EMBEDDED_MAX_NEW_TOKENS  # what `python -m nanotulu.eval` uses for the embedded model
    stage_dir = {s: os.path.join(out, s) for s in ("sft", "dpo", "rlvr", "ppo")}
    fresh = ["--resume", "false"] if args.fresh else []
    shared = ["--threads", str(args.threads), *fresh]  # every stage on the pipeline's thread count
    sft_model, dpo_model = os.path.join(stage_dir["sft"], "final"), os.path.join(stage_dir["dpo"], "final")
    stages = [  # (name, trainer module, its flags)
        ("sft", train_sft, ["--output_dir", stage_dir["sft"], *shared]),
        ("dpo", train_dpo, ["--model", sft_model, "--tokenizer", "byte", "--data", embedded.asset("dpo.jsonl"),
                            "--output_dir", stage_dir["dpo"], *preset_flags(train_dpo.EMBEDDED_PRESET), *shared]),
        ("rlvr", train_rlvr, ["--model", dpo_model, "--tokenizer", "byte", "--data",
                              embedded.asset("rlvr_train.jsonl"), "--output_dir", stage_dir["rlvr"],
                              *preset_flags(train_rlvr.EMBEDDED_PRESET), *shared]),
        ("ppo", train_rlvr, ["--algo", "ppo", "--model", dpo_model, "--tokenizer", "byte", "--data",
                             embedded.asset("rlvr_train.jsonl"), "--output_dir", stage_dir["ppo"],
                             *preset_flags(train_rlvr.EMBEDDED_PPO_PRESET), *shared])]
    if args.lora or args.quantize:  # LoRA: adapters in every stage, merged so the next stage starts from them
        presets = {"sft": train_sft.EMBEDDED_PRESET, "dpo": train_dpo.EMBEDDED_PRESET,
                   "rlvr": train_rlvr.EMBEDDED_PRESET, "ppo": train_rlvr.EMBEDDED_PPO_PRESET}
        stages = [(name, trainer, flags + ["--lora", "true", "--merge", "true", "--quantize", args.quantize, "--lr",
                                           str(presets[name]["lr"] * args.lora_lr_scale)])
                  for name, trainer, flags in stages]
    stages = [st for st in stages if st[0] in ("sft", "dpo") or {"grpo": "rlvr", "ppo": "ppo"}.get(args.rl, st[0])
              == st[0]]

    def done(stage, trainer, flags):
        """The stage's final/ exists and was trained with these flags (its run_config.json): reuse it."""
        final, saved = os.path.join(stage_dir[stage], "final"), os.path.join(stage_dir[stage], "run_config.json")
        if args.fresh or not os.path.isfile(os.path.join(final, "config.json")) or not os.path.isfile(saved):
            return False
        cls = {"sft": train_sft.SFTConfig, "dpo": train_dpo.DPOConfig}.get(stage, train_rlvr.RLVRConfig)
        variant = train_rlvr.variant_defaults if trainer is train_rlvr else None
        with open(saved) as f:
            return not run.config_diff(json.load(f), dataclasses.asdict(
                resolve_flags(cls, trainer.EMBEDDED_PRESET, flags, variant)))

    timings = {}
    table = [("init", *held_out_accuracy(None, test_rows, eval_tokens))]
    upstream_ran = False
    for stage, trainer, flags in stages:
        t = time.perf_counter()
        if upstream_ran or not done(stage, trainer, flags):
            # after a retrained stage, the next ones start over: their checkpoints came from the old model
            trainer.main(flags + (["--resume", "false"] if upstream_ran and not args.fresh else []), finish=False)
            upstream_ran = upstream_ran or stage in ("sft", "dpo")  # the two RL stages are siblings
        timings[stage] = time.perf_counter() - t
        table.append((stage, *held_out_accuracy(os.path.join(stage_dir[stage], "final"), test_rows, eval_tokens)))

    names = sorted({k for _, _, per in table for k in per})
    lines = ["| stage | held-out accuracy | " + " | ".join(names) + " | train time (s) |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for stage, acc, per in table:
        lines.append(f"| {stage} | {acc:.3f} | " + " | ".join(f"{per.get(n, 0):.3f}" for n in names)
                     + f" | {timings.get(stage, 0):.0f} |")
    total = time.perf_counter() - t0
    summary = "\n".join(lines) + f"\n\n{len(test_rows)} held-out prompts (rlvr_test.jsonl), greedy; " \
                                 f"whole pipeline {total:.0f} s on {run.device_name()}.\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    try:
        png = plot(out, table)
    except ImportError as e:
        png = f"not drawn: {e}"
    print("\n" + summary + f"curves: {png}")
    run.finish_distributed()
    return table


if __name__ == "__main__":
    run.run_script(main)
