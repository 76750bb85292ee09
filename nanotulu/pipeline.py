"""The whole Tulu 3 recipe on the embedded default: SFT -> DPO -> RLVR, with held-out accuracy after each stage.

    python -m nanotulu.pipeline            # CPU, the embedded tiny model and synthetic verifiable tasks
    python -m nanotulu.pipeline --rl both  # RLVR by GRPO and by PPO (a value model), both from the DPO model
    python -m nanotulu.pipeline --lora     # DPO and RLVR with LoRA adapters on the full SFT (--quantize nf4: QLoRA)
    python -m nanotulu.pipeline --compare --rl both   # full, LoRA and QLoRA side by side (Tulu 2's comparison)

Writes runs/pipeline/{sft,dpo,rlvr,ppo}/ (metrics.jsonl, checkpoints, final HF model), runs/pipeline/summary.md (the
accuracy table) and runs/pipeline/curves.png (each stage's training curves and the accuracy per stage); LoRA runs
write runs/pipeline-lora/, QLoRA runs runs/pipeline-qlora/, and --compare runs/pipeline/comparison.md.
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


def plot(out_dir, folders, table):
    """out_dir/curves.png from the stages' metrics (folders: stage -> its folder)."""
    matplotlib = data.optional_import("matplotlib", "plot", "the pipeline's curves.png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    sft = read_jsonl(os.path.join(folders["sft"], "metrics.jsonl"))
    ax[0, 0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    ax[0, 0].set(title="SFT: loss (sum semantics)", xlabel="step", ylabel="loss")
    dpo = read_jsonl(os.path.join(folders["dpo"], "metrics.jsonl"))
    curve(ax[0, 1], dpo, "loss", "loss", "C0")
    curve(ax[0, 1], dpo, "rewards/accuracy", "rewards/accuracy", "C1")
    ax[0, 1].set(title="DPO (dpo_norm)", xlabel="step")
    ax[0, 1].legend()
    for stage, label, color in (("rlvr", "GRPO", "C2"), ("ppo", "PPO", "C3")):
        if any(t[0] == stage for t in table):
            rl = read_jsonl(os.path.join(folders[stage], "metrics.jsonl"))
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


METHODS = {"full": "", "lora": "-lora", "qlora": "-qlora"}  # method -> suffix of its output folder


def method_of(args):
    return "qlora" if args.quantize else "lora" if args.lora else "full"


ANCESTORS = {"sft": (), "dpo": ("sft",), "rlvr": ("sft", "dpo"), "ppo": ("sft", "dpo")}  # each stage's model chain


def pipeline_stages(args, method):
    """[(stage, its folder, trainer module, its flags)] of one pipeline: full fine-tuning, or adapters in the stages
    of args.lora_stages. A LoRA pipeline's stage with no adapters in it or upstream is the full pipeline's own stage:
    its folder is shared."""
    adapters = set(args.lora_stages.split(",")) if method != "full" else set()
    out = args.output_dir + METHODS[method]
    stage_dir = {s: os.path.join(out if adapters & {s, *up} else args.output_dir, s) for s, up in ANCESTORS.items()}
    fresh = ["--resume", "false"] if args.fresh else []
    shared = ["--threads", str(args.threads), *fresh]  # every stage on the pipeline's thread count
    sft_model, dpo_model = os.path.join(stage_dir["sft"], "final"), os.path.join(stage_dir["dpo"], "final")
    stages = [  # (name, trainer module, its preset, its flags)
        ("sft", train_sft, train_sft.EMBEDDED_PRESET, ["--output_dir", stage_dir["sft"], *shared]),
        ("dpo", train_dpo, train_dpo.EMBEDDED_PRESET,
         ["--model", sft_model, "--tokenizer", "byte", "--data", embedded.asset("dpo.jsonl"),
          "--output_dir", stage_dir["dpo"], *preset_flags(train_dpo.EMBEDDED_PRESET), *shared]),
        ("rlvr", train_rlvr, train_rlvr.EMBEDDED_PRESET,
         ["--model", dpo_model, "--tokenizer", "byte", "--data", embedded.asset("rlvr_train.jsonl"),
          "--output_dir", stage_dir["rlvr"], *preset_flags(train_rlvr.EMBEDDED_PRESET), *shared]),
        ("ppo", train_rlvr, train_rlvr.EMBEDDED_PPO_PRESET,
         ["--algo", "ppo", "--model", dpo_model, "--tokenizer", "byte", "--data", embedded.asset("rlvr_train.jsonl"),
          "--output_dir", stage_dir["ppo"], *preset_flags(train_rlvr.EMBEDDED_PPO_PRESET), *shared])]
    keep = {"sft", "dpo"} | {"grpo": {"rlvr"}, "ppo": {"ppo"}, "both": {"rlvr", "ppo"}}[args.rl]
    # LoRA: adapters on a frozen base at lora_lr_scale x the preset's lr, merged into final/ for the next stage
    lora = ["--lora", "true", "--merge", "true", "--quantize", "nf4" if method == "qlora" else ""]
    return [(name, stage_dir[name], trainer,
             flags + (lora + ["--lr", str(preset["lr"] * args.lora_lr_scale)] if name in adapters else []))
            for name, trainer, preset, flags in stages if name in keep]


def run_pipeline(args, method):
    """Train the stages of one method, reusing those already trained with the same flags.
    -> [(stage, held-out accuracy, {dataset: accuracy}, train seconds)], {stage: its folder}, number of prompts."""
    test_rows = rewards.load_rlvr_rows(embedded.asset("rlvr_test.jsonl"))
    eval_tokens = EMBEDDED_MAX_NEW_TOKENS  # what `python -m nanotulu.eval` uses for the embedded model

    def done(folder, trainer, flags):
        """The stage's final/ exists and was trained with these flags (its run_config.json): reuse it."""
        final, saved = os.path.join(folder, "final"), os.path.join(folder, "run_config.json")
        if args.fresh or not os.path.isfile(os.path.join(final, "config.json")) or not os.path.isfile(saved):
            return False
        cls = {train_sft: train_sft.SFTConfig, train_dpo: train_dpo.DPOConfig}.get(trainer, train_rlvr.RLVRConfig)
        variant = train_rlvr.variant_defaults if trainer is train_rlvr else None
        with open(saved) as f:
            return not run.config_diff(json.load(f), dataclasses.asdict(
                resolve_flags(cls, trainer.EMBEDDED_PRESET, flags, variant)))

    table = [("init", *held_out_accuracy(None, test_rows, eval_tokens), 0.0)]
    upstream_ran, folders = False, {}
    for stage, folder, trainer, flags in pipeline_stages(args, method):
        folders[stage] = folder
        timing = os.path.join(folder, "train_seconds.txt")  # a reused stage reports the time it took when it ran
        if upstream_ran or not done(folder, trainer, flags):
            t = time.perf_counter()
            # after a retrained stage, the next ones start over: their checkpoints came from the old model
            trainer.main(flags + (["--resume", "false"] if upstream_ran and not args.fresh else []), finish=False)
            upstream_ran = upstream_ran or stage in ("sft", "dpo")  # the two RL stages are siblings
            seconds = time.perf_counter() - t
            os.makedirs(folder, exist_ok=True)
            with open(timing, "w") as f:
                f.write(f"{seconds:.1f}\n")
        else:
            seconds = float(open(timing).read()) if os.path.isfile(timing) else float("nan")
        table.append((stage, *held_out_accuracy(os.path.join(folder, "final"), test_rows, eval_tokens), seconds))
    return table, folders, len(test_rows)


def summary_table(table):
    names = sorted({k for _, _, per, _ in table for k in per})
    lines = ["| stage | held-out accuracy | " + " | ".join(names) + " | train time (s) |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for stage, acc, per, seconds in table:
        lines.append(f"| {stage} | {acc:.3f} | " + " | ".join(f"{per.get(n, 0):.3f}" for n in names)
                     + f" | {seconds:.0f} |")
    return "\n".join(lines)


def comparison_table(tables, folders, lora_stages):
    """Full fine-tuning beside LoRA and QLoRA, stage by stage: held-out accuracy (train seconds). folders: method ->
    {stage: its folder}; a LoRA pipeline's stage in the full pipeline's folder is that stage (shared)."""
    methods = list(tables)
    lines = ["| stage | " + " | ".join(f"{m}: accuracy (train s)" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for i, (stage, *_rest) in enumerate(tables[methods[0]]):
        cells = []
        for m in methods:
            _, acc, _, seconds = tables[m][i]
            shared = m != "full" and folders[m].get(stage) == folders["full"].get(stage)
            cells.append(f"{acc:.3f}" + ("" if stage == "init" else " (full's)" if shared else f" ({seconds:.0f})"))
        lines.append(f"| {stage}{' (adapters)' if stage in lora_stages else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanotulu.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/pipeline", help="stage outputs and the summary; LoRA runs write to "
                   "OUTPUT_DIR-lora, QLoRA runs to OUTPUT_DIR-qlora (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="rerun every stage from scratch (default: off: a stage whose "
                   "final/ exists and was trained with the same flags is reused; one with other flags is refused)")
    p.add_argument("--threads", type=int, default=run.EMBEDDED_THREADS, help="CPU threads; results depend on it "
                   "(float sums split differently): README's table is for the default (default: %(default)s)")
    p.add_argument("--rl", default="grpo", choices=("grpo", "ppo", "both"), help="the RLVR stage: GRPO (stage "
                   "'rlvr'), PPO with a value model (stage 'ppo'), or both from the same DPO model (default: "
                   "%(default)s)")
    p.add_argument("--lora", action="store_true", help="the stages in --lora_stages train LoRA adapters "
                   "(nanotulu/lora.py's defaults: rank 64, alpha 16, dropout 0.1 on q,k,v,o,gate,up,down) at "
                   "--lora_lr_scale x its preset's lr, merged into its final/ for the next stage (default: off: full "
                   "fine-tuning)")
    p.add_argument("--quantize", default="", choices=("", "nf4"), help="nf4: QLoRA, the adapter stages' frozen base "
                   "in 4-bit NF4 (implies --lora) (default: '': full-precision base)")
    p.add_argument("--lora_stages", default="dpo,rlvr,ppo", help="the stages that train adapters. Not SFT by "
                   "default: Tülu 2 put adapters on a pretrained base, and the embedded model starts from random "
                   "weights, so its full SFT plays the pretrained base (adapters on the random base learn little: "
                   "README) (default: %(default)s)")
    p.add_argument("--lora_lr_scale", type=float, default=5.0, help="LoRA lr / full lr (Tülu 2: QLoRA 1e-4 beside "
                   "full 2e-5) (default: %(default)s)")
    p.add_argument("--compare", action="store_true", help="Tülu 2's comparison at toy scale: the full, LoRA and "
                   "QLoRA pipelines one after another (each reusing what it already trained), then a table of the "
                   "three side by side in OUTPUT_DIR/comparison.md (default: off)")
    args = p.parse_args(argv)
    unknown = set(args.lora_stages.split(",")) - {"sft", "dpo", "rlvr", "ppo"}
    if unknown:
        p.error(f"--lora_stages: unknown stage(s) {sorted(unknown)}; choose from sft, dpo, rlvr, ppo")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    methods = list(METHODS) if args.compare else [method_of(args)]
    tables, folders_of = {}, {}
    for method in methods:
        out, t = args.output_dir + METHODS[method], time.perf_counter()
        table, folders, n_rows = run_pipeline(args, method)
        tables[method], folders_of[method] = table, folders
        summary = summary_table(table) + f"\n\n{n_rows} held-out prompts (rlvr_test.jsonl), greedy; method {method}" \
            + (f" (adapters in {args.lora_stages})" if method != "full" else "") \
            + f"; this run {time.perf_counter() - t:.0f} s on {run.device_name()} (a reused stage shows the train " \
            + "time it took when it ran).\n"
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(summary)
        try:
            png = plot(out, folders, table)
        except ImportError as e:
            png = f"not drawn: {e}"
        print("\n" + summary + f"curves: {png}")
    if args.compare:
        text = comparison_table(tables, folders_of, set(args.lora_stages.split(","))) + \
            f"\n\nLoRA lr = {args.lora_lr_scale} x each preset's; {time.perf_counter() - t0:.0f} s in all.\n"
        with open(os.path.join(args.output_dir, "comparison.md"), "w") as f:
            f.write(text)
        print("\n" + text)
    run.finish_distributed()
    return tables if args.compare else tables[methods[0]]


if __name__ == "__main__":
    run.run_script(main)
