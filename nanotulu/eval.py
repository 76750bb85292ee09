"""Scores a checkpoint on RLVR-format data: generate an answer to every prompt, verify it, report per data set.

    python -m nanotulu.eval --model DIR --data gsm8k.jsonl math.jsonl [--out results.json] [--max_new_tokens 512]
    torchrun --nproc_per_node 8 -m nanotulu.eval --model DIR --data ... --tp 2   # FSDP2 x tensor parallel

Rows are RLVR rows (docs/RECIPE.md): `messages` (a final assistant turn is the reference answer and is dropped from the
prompt), `ground_truth`, and `dataset`, which names the verifier of nanotulu.rewards (gsm8k, math, ifeval,
string_match, or a list of them); without nanotulu.rewards, answers are scored by exact match of stripped strings.
Prompts are rendered with the checkpoint's chat template (its tokenizer's own, which a nanotulu export sets to the
template trained with; else "tulu"; --template tulu | hf | a Jinja file overrides it), generated greedily by default
with nanotulu.generate in batches of similar length, and the score of a data set is the mean verifier score.

`evaluate(model, tok, rows, ...)` is the same thing as a function, for the train scripts: under torch.distributed
each rank generates its share of the rows (the FSDP / tensor-parallel weights are gathered once for the whole
evaluation: every rank decodes with full weights) and every rank gets the full results. Under torchrun the command
line places the model on a (dp, tp) mesh as the trainers do (--tp), so a checkpoint sharded for training is
evaluated the same way; the gathered weights must fit on one device.
"""

import argparse
import json
import os
import sys
import time

import torch

from nanotulu.flags import HelpFormatter
from nanotulu.generate import generate
from nanotulu.parallel import gathered


def _dataset_name(dataset):
    return dataset if isinstance(dataset, str) else "+".join(dataset)


def score_responses(rows, responses, workers=0):
    """Verifier scores in [0, 1] of each response. nanotulu.rewards' verifiers when present, else exact match."""
    try:
        from nanotulu.rewards import verify_batch
    except ImportError:
        return [float(r.strip() == str(row["ground_truth"]).strip()) for row, r in zip(rows, responses)]
    scores, _ = verify_batch([row["dataset"] for row in rows], responses, [row["ground_truth"] for row in rows],
                             workers=workers)
    return scores


def decode_response(tok, ids):
    """Text of generated ids, special tokens skipped. The embedding may have more rows than the tokenizer has
    tokens (rounded up to a multiple of 8), and an untrained model can emit those ids: they are dropped."""
    try:
        return tok.decode(ids, skip_special_tokens=True)
    except (ValueError, KeyError, IndexError, OverflowError):
        known = []
        for i in ids:
            try:
                tok.decode([i])
                known.append(i)
            except (ValueError, KeyError, IndexError, OverflowError):
                pass
        return tok.decode(known, skip_special_tokens=True)


def encode_prompts(tok, rows, template="tulu", add_bos=False):
    """Chat-rendered prompt token ids of each row (generation prompt appended)."""
    from nanotulu.data import render_chat

    prompts = []
    for row in rows:
        text = render_chat(row["prompt_messages"], template=template, eos_token=tok.eos_token,
                           add_generation_prompt=True, bos_token=getattr(tok, "bos_token", None) or "")
        ids = tok.encode(text)
        if add_bos and getattr(tok, "bos_token_id", None) is not None and ids[:1] != [tok.bos_token_id]:
            ids = [tok.bos_token_id] + ids
        prompts.append(ids)
    return prompts


@torch.no_grad()
def evaluate(model, tok, rows, *, batch_size=64, max_new_tokens=512, template="tulu", greedy=True,
             temperature=1.0, seed=0, add_bos=False, verify_workers=0, progress=True, compile=False):
    """rows: dicts with prompt_messages, ground_truth, dataset (as nanotulu.rewards.load_rlvr_rows returns).
    -> {"datasets": {name: {n, score, stopped, mean_tokens}}, "overall": {...}, "samples": [per row]}.
    Raises ValueError before generating anything when a prompt does not fit the context or the tokenizer has no
    EOS token. Collective under torch.distributed: every rank must call it with the same rows."""
    import torch.distributed as dist

    if getattr(tok, "eos_token_id", None) is None or getattr(tok, "eos_token", None) is None:
        raise ValueError("the tokenizer has no EOS token: generation could never stop")
    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"need max_new_tokens > 0 and batch_size > 0, got {max_new_tokens} and {batch_size}")
    if not rows:
        raise ValueError("no rows to evaluate")
    prompts = encode_prompts(tok, rows, template, add_bos)
    context = model.cfg.max_position_embeddings
    for row, p in zip(rows, prompts):
        if len(p) + max_new_tokens > context:
            where = row.get("source", "a row")
            raise ValueError(f"{where}: the prompt has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                             f"exceeds the model context of {context}")

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(rows), world))
    mine.sort(key=lambda i: -len(prompts[i]))  # batches of similar length: little left padding
    outputs = {}
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="eval", unit="prompt", dynamic_ncols=True)
    t0 = time.perf_counter()
    # compiled: one cache length for every batch, so the decode step compiles once (batch shapes then differ only
    # in the last batch)
    max_len = max(len(p) for p in prompts) + max_new_tokens if compile else None
    with gathered(model) as m:  # FSDP: one all-gather for the whole evaluation, then no collective per batch
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            res = generate(m, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                           eos_token_id=tok.eos_token_id, greedy=greedy, temperature=temperature,
                           seed=seed + start, compile=compile, max_len=max_len)
            for i, r in zip(idx, res):
                outputs[i] = r
            if bar is not None:
                bar.update(len(idx) * world)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0

    my_samples = []
    indices = sorted(outputs)
    responses = [decode_response(tok, outputs[i]["tokens"]) for i in indices]
    scores = score_responses([rows[i] for i in indices], responses, verify_workers)
    for i, text, score in zip(indices, responses, scores):
        my_samples.append(dict(index=i, source=rows[i].get("source"), dataset=_dataset_name(rows[i]["dataset"]),
                               prompt_tokens=len(prompts[i]), response=text, score=float(score),
                               finish_reason=outputs[i]["finish_reason"], new_tokens=len(outputs[i]["tokens"])))
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, my_samples)
        my_samples = [s for part in everyone for s in part]
    samples = sorted(my_samples, key=lambda s: s["index"])

    def summary(group):
        return dict(n=len(group), score=sum(s["score"] for s in group) / len(group),
                    stopped=sum(s["finish_reason"] == "stop" for s in group) / len(group),
                    mean_tokens=sum(s["new_tokens"] for s in group) / len(group))

    names = sorted({s["dataset"] for s in samples})
    new_tokens = sum(s["new_tokens"] for s in samples)
    return dict(datasets={n: summary([s for s in samples if s["dataset"] == n]) for n in names},
                overall=dict(summary(samples), seconds=seconds, tokens_per_s=new_tokens / max(seconds, 1e-9)),
                samples=samples)


def format_table(results):
    lines = [f"{'data set':<24} {'n':>6} {'score':>7} {'stopped':>8} {'tokens':>7}"]
    for name, r in list(results["datasets"].items()) + [("overall", results["overall"])]:
        lines.append(f"{name:<24} {r['n']:>6} {100 * r['score']:>6.1f}% {100 * r['stopped']:>7.1f}% "
                     f"{r['mean_tokens']:>7.1f}")
    return "\n".join(lines)


# The pipeline's evaluation of the embedded model (nanotulu.pipeline): its answers need ~80 tokens.
EMBEDDED_MAX_NEW_TOKENS = 96


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanotulu.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--data", required=True, nargs="+", help="RLVR rows: mixes 'file[:amount],...' as the "
                        "trainers take (amount: 0.5 = fraction, 500 = rows); several mixes add up")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or 'byte' (None: --model)")
    parser.add_argument("--template", default=None, help="'tulu', 'hf' (the tokenizer's chat_template) or a path to a "
                        "Jinja file (None: the checkpoint's own: its tokenizer's chat_template, else tulu)")
    parser.add_argument("--out", default="eval_results.json", help="JSON results file (checked before any work)")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts generated together")
    parser.add_argument("--max_new_tokens", type=int, default=0, help="answer length limit (0: "
                        f"{EMBEDDED_MAX_NEW_TOKENS} with the byte tokenizer, as the pipeline evaluates the embedded "
                        "model; else 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    parser.add_argument("--limit", type=int, default=0, help="first N rows of each file, before its amount (0: all)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="weights and compute (auto: bfloat16 on GPU, float32 on CPU, as the trainers)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--add_bos", action="store_true", help="prepend the tokenizer's BOS token to prompts")
    parser.add_argument("--compile", action="store_true", help="compiled decode step (CUDA graph on GPU)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree under torchrun (the weights are "
                        "sharded FSDP2 x TP and gathered for generation)")
    parser.add_argument("--verify_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="verifier worker processes (0: in this process)")
    args = parser.parse_args(argv)

    # everything a user can get wrong is checked before the model is loaded
    import numpy as np

    from nanotulu.run import check_output_path
    from nanotulu.data import load_tokenizer, parse_mix, resolve_template, select_rows
    from nanotulu.model import Llama
    from nanotulu.rewards import load_rlvr_rows

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"--model {args.model}: not a model directory (no config.json)")
    try:
        check_output_path(args.out, "--out", folder=False)
        sources = [src for spec in args.data for src in parse_mix(spec)]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for path, _ in sources:
        if not os.path.isfile(path):
            raise SystemExit(f"--data {path}: no such file")
    if args.max_new_tokens < 0:
        raise SystemExit(f"--max_new_tokens must be positive (or 0: auto), got {args.max_new_tokens}")
    tok = load_tokenizer(args.tokenizer or args.model)
    max_new_tokens = args.max_new_tokens or (EMBEDDED_MAX_NEW_TOKENS if tok.name == "byte" else 512)
    try:
        template = resolve_template(args.template, tok)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    rows = []
    for k, (path, amount) in enumerate(sources):
        file_rows = load_rlvr_rows(path)
        if not file_rows:
            raise SystemExit(f"--data {path}: no rows")
        file_rows = file_rows[:args.limit] if args.limit > 0 else file_rows
        rows.extend(select_rows(file_rows, amount, np.random.default_rng([args.seed, k])))
    if args.tp < 1:
        raise SystemExit(f"--tp must be >= 1, got {args.tp}")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if args.device.startswith("cuda") else "float32")
    rank, distributed = 0, args.tp > 1 or "RANK" in os.environ
    if distributed:  # torchrun: every rank evaluates its share of the rows
        from nanotulu import parallel, run

        rank, world, device = run.init_distributed()
        try:
            mesh = parallel.build_mesh(world, -1, args.tp, device)
        except ValueError as e:
            raise SystemExit(f"--tp {args.tp}: {e}")
        model = Llama.from_pretrained(args.model, dtype=getattr(torch, dtype), device=device)
        model = parallel.parallelize(model, mesh).eval()
    else:
        model = Llama.from_pretrained(args.model, dtype=getattr(torch, dtype), device=args.device).eval()

    results = evaluate(model, tok, rows, batch_size=args.batch_size, max_new_tokens=max_new_tokens,
                       template=template, greedy=args.temperature == 0, temperature=args.temperature or 1.0,
                       seed=args.seed, add_bos=args.add_bos, verify_workers=args.verify_workers,
                       compile=args.compile)
    results["config"] = dict(vars(args), dtype=dtype, max_new_tokens=max_new_tokens)
    if rank == 0:
        print(format_table(results))
        o = results["overall"]
        print(f"{o['n']} prompts in {o['seconds']:.1f} s ({o['tokens_per_s']:.0f} new tokens/s)")
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    if distributed:
        from nanotulu.run import finish_distributed
        finish_distributed()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
