"""The embedded default data: small synthetic, verifiable tasks a tiny byte-level Llama can learn on a CPU.

Task: two-number addition written as a worked answer, column by column (a tiny model learns the one-digit steps
far sooner than whole sums), sometimes with a format instruction of the kind IFEval checks.

    python -m nanotulu.embedded --write                 # rewrites the files in nanotulu/assets/ (deterministic)
    python -m nanotulu.embedded --write --out_dir DIR   # writes them elsewhere (diff against the shipped ones)

Files (Tulu formats, docs/RECIPE.md):
- sft.jsonl          `messages` with worked answers;
- dpo.jsonl          `chosen` (the correct worked answer) / `rejected` (a worked answer with one realistic
                     mistake: a misread digit or a wrong column sum);
- rlvr_train.jsonl   `messages` prompt, `ground_truth`, `dataset` ("gsm8k" numeric, or "ifeval" constraints);
- rlvr_test.jsonl    held-out prompts (never in any training file) for the accuracy after each stage.
"""

import json
import os
import random

from nanotulu.model import LlamaConfig

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# The embedded tiny Llama: byte-level vocabulary (256 bytes + specials, padded to 264), small enough to train on a
# laptop CPU in minutes. Random init from a seed; no weights are shipped.
EMBEDDED_MODEL = LlamaConfig(vocab_size=264, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=6, num_key_value_heads=2, rope_theta=10000.0,
                             max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)

# Format instructions: (instruction text, IFEval instruction id, kwargs, how a correct answer is rewritten)
FORMATS = [
    ("Answer in lowercase letters only.", "change_case:english_lowercase", {}, lambda s: s.lower()),
    ("End your response with the exact phrase 'Done.'", "startend:end_checker", {"end_phrase": "Done."},
     lambda s: s + " Done."),
    ("Do not use any commas in your response.", "punctuation:no_comma", {}, lambda s: s.replace(",", "")),
]


def worked_answer(a, b, total=None, read_a=None, column_error=None):
    """Column addition, ones then tens then hundreds, e.g. 47 + 38: '7+8=15, write 5, carry 1. 4+3+1=8, write 8.
    So 47+38=85. The answer is 85.'
    For the wrong answers of the preference data, the mistakes the embedded model makes: `read_a` works with a
    misread first operand; `column_error=(column, delta)` gets one column sum wrong; `total` overrides the result.
    The steps stay consistent with the mistake, as a model's would."""
    x_num = a if read_a is None else read_a
    steps, carry, da, db = [], 0, str(x_num)[::-1], str(b)[::-1]
    digits = []
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        if column_error is not None and column_error[0] == i:
            s = max(0, s + column_error[1])
        plus = f"+{carry}" if carry else ""
        steps.append(f"{x}+{y}{plus}={s}, write {s % 10}" + (", carry 1." if s >= 10 else "."))
        digits.append(s % 10)
        carry = s // 10
    if carry:
        steps.append("write 1.")
        digits.append(1)
    result = int("".join(map(str, reversed(digits))))
    total = result if total is None else total
    return " ".join(steps) + f" So {a}+{b}={total}. The answer is {total}."


def question(a, b):
    return f"What is {a} + {b}?"


def wrong_answer(rng, a, b):
    """A worked answer with one realistic mistake (misread digit or a wrong column sum); never the right total."""
    for _ in range(20):
        if rng.random() < 0.5:
            digits = list(str(a))
            k = rng.randrange(len(digits))
            digits[k] = str((int(digits[k]) + rng.choice([1, 2, 3, 7, 8, 9])) % 10)
            text = worked_answer(a, b, read_a=int("".join(digits)))
        else:
            text = worked_answer(a, b, column_error=(rng.randrange(len(str(max(a, b)))), rng.choice([-2, -1, 1, 2])))
        if not text.endswith(f"The answer is {a + b}."):
            return text
    return worked_answer(a, b, total=a + b + 1)


def make_all(seed=0, n_sft=6000, n_dpo=2000, n_rlvr=2000, n_test=200, max_operand=99):
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:]  # held-out sums never seen in training

    def pick():
        return train_pairs[rng.randrange(len(train_pairs))]

    def maybe_format(p_fmt):
        return FORMATS[rng.randrange(len(FORMATS))] if rng.random() < p_fmt else None

    sft = []
    for _ in range(n_sft):
        a, b = pick()
        fmt, answer = maybe_format(0.25), worked_answer(a, b)
        q = question(a, b) if fmt is None else f"{question(a, b)} {fmt[0]}"
        sft.append({"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": answer if fmt is None else fmt[3](answer)}]})
    dpo = []
    for _ in range(n_dpo):
        a, b = pick()
        prompt = [{"role": "user", "content": question(a, b)}]
        dpo.append({"chosen": prompt + [{"role": "assistant", "content": worked_answer(a, b)}],
                    "rejected": prompt + [{"role": "assistant", "content": wrong_answer(rng, a, b)}]})

    def rlvr_row(a, b, fmt):
        if fmt is None:
            return {"messages": [{"role": "user", "content": question(a, b)}], "ground_truth": str(a + b),
                    "dataset": "gsm8k"}
        gt = {"instruction_id_list": [fmt[1]], "kwargs": [fmt[2]]}
        return {"messages": [{"role": "user", "content": f"{question(a, b)} {fmt[0]}"}],
                "ground_truth": json.dumps(gt), "dataset": "ifeval"}

    rlvr = [rlvr_row(*pick(), maybe_format(0.2)) for _ in range(n_rlvr)]
    test = [rlvr_row(a, b, maybe_format(0.2)) for a, b in test_pairs]
    return {"sft.jsonl": sft, "dpo.jsonl": dpo, "rlvr_train.jsonl": rlvr, "rlvr_test.jsonl": test}


def write_all(out_dir=ASSETS):
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in make_all().items():
        with open(os.path.join(out_dir, name), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{os.path.join(out_dir, name)}: {len(rows)} rows")


def asset(name):
    """Path of a shipped asset file, e.g. asset("sft.jsonl")."""
    return os.path.join(ASSETS, name)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m nanotulu.embedded", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--write", action="store_true", help="regenerate the asset files (without it nothing is written)")
    p.add_argument("--out_dir", default=ASSETS, help="where --write writes them")
    args = p.parse_args(argv)
    if not args.write:
        p.print_help()
        return
    write_all(args.out_dir)


if __name__ == "__main__":
    main()
