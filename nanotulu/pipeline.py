"""The whole Tulu 3 recipe on the embedded default: SFT -> DPO -> RLVR, with held-out accuracy after each stage.

    python -m nanotulu.pipeline            # CPU, the embedded tiny model and synthetic verifiable tasks

Writes runs/pipeline/{sft,dpo,rlvr}/ (metrics.jsonl, checkpoints, final HF model), runs/pipeline/summary.md (the
accuracy table) and runs/pipeline/curves.png (each stage's training curves and the accuracy per stage).
"""

import argparse
import json
import os
import time

import torch

from nanotulu import common, data, embedded, rewards, train_dpo, train_rlvr, train_sft
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
    rl = read_jsonl(os.path.join(out_dir, "rlvr", "metrics.jsonl"))
    curve(ax[1, 0], rl, "score", "rollout verifier score", "C2")
    ax[1, 0].set(title="RLVR (GRPO)", xlabel="step")
    ax[1, 0].legend()
    names = [t[0] for t in table]
    ax[1, 1].bar(names, [t[1] for t in table], color=["grey", "C0", "C1", "C2"][:len(names)])
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
    p.add_argument("--fresh", action="store_true", help="ignore finished stages in output_dir and rerun them "
                   "(default: off: a stage whose final/ exists is reused)")
    args = p.parse_args(argv)
    out = args.output_dir
    t0 = time.perf_counter()
    test_rows = rewards.load_rlvr_rows(embedded.asset("rlvr_test.jsonl"))
    eval_tokens = train_rlvr.EMBEDDED_PRESET["max_new_tokens"]
    stage_dir = {s: os.path.join(out, s) for s in ("sft", "dpo", "rlvr")}
    fresh = ["--resume", "false"] if args.fresh else []

    def done(stage):
        return not args.fresh and os.path.isfile(os.path.join(stage_dir[stage], "final", "config.json"))

    timings = {}
    table = [("init", *held_out_accuracy(None, test_rows, eval_tokens))]
    t = time.perf_counter()
    if not done("sft"):
        train_sft.main(["--output_dir", stage_dir["sft"], *fresh], finish=False)
    timings["sft"] = time.perf_counter() - t
    sft_model = os.path.join(stage_dir["sft"], "final")
    table.append(("sft", *held_out_accuracy(sft_model, test_rows, eval_tokens)))

    t = time.perf_counter()
    if not done("dpo"):
        train_dpo.main(["--model", sft_model, "--tokenizer", "byte", "--data", embedded.asset("dpo.jsonl"),
                        "--output_dir", stage_dir["dpo"], *preset_flags(train_dpo.EMBEDDED_PRESET), *fresh],
                       finish=False)
    timings["dpo"] = time.perf_counter() - t
    dpo_model = os.path.join(stage_dir["dpo"], "final")
    table.append(("dpo", *held_out_accuracy(dpo_model, test_rows, eval_tokens)))

    t = time.perf_counter()
    if not done("rlvr"):
        train_rlvr.main(["--model", dpo_model, "--tokenizer", "byte",
                         "--data", embedded.asset("rlvr_train.jsonl"), "--output_dir", stage_dir["rlvr"],
                         *preset_flags(train_rlvr.EMBEDDED_PRESET), *fresh], finish=False)
    timings["rlvr"] = time.perf_counter() - t
    table.append(("rlvr", *held_out_accuracy(os.path.join(stage_dir["rlvr"], "final"), test_rows, eval_tokens)))

    names = sorted({k for _, _, per in table for k in per})
    lines = ["| stage | held-out accuracy | " + " | ".join(names) + " | train time (s) |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for stage, acc, per in table:
        lines.append(f"| {stage} | {acc:.3f} | " + " | ".join(f"{per.get(n, 0):.3f}" for n in names)
                     + f" | {timings.get(stage, 0):.0f} |")
    total = time.perf_counter() - t0
    summary = "\n".join(lines) + f"\n\n{len(test_rows)} held-out prompts (rlvr_test.jsonl), greedy; " \
                                 f"whole pipeline {total:.0f} s on {common.device_name()}.\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    try:
        png = plot(out, table)
    except ImportError as e:
        png = f"not drawn: {e}"
    print("\n" + summary + f"curves: {png}")
    common.finish_distributed()
    return table


if __name__ == "__main__":
    main()
