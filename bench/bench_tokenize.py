"""Cost of tokenizing an SFT data set: one process with no cache (how nanotulu tokenized before: every start, every
rank), worker processes writing the cache (the first start), and reading the cache (every later start and every
other rank).

    python bench/bench_tokenize.py                     # 100k synthetic multi-turn rows, a small BPE tokenizer
    python bench/bench_tokenize.py --rows 20000 --workers 4 --tokenizer byte

"Before" is tokenize_sft(incremental=False): every prefix of a conversation encoded whole, as the masks were
computed before (O(turns^2) tokens encoded per row); "incremental" reads the prefix counts off one encoding.
Rows: a system turn and --turns user/assistant exchanges of random words (lengths vary), written to a JSONL file in
a temporary folder. Tokenizer: a byte-level BPE of --vocab tokens trained here with the `tokenizers` package on the
same words (or the embedded byte tokenizer). Each figure is one run of data.load_sft_dataset (tulu template, max
length 4096); the outputs of the three ways are checked to be equal.
"""
import argparse
import functools
import json
import os
import tempfile
import time

import numpy as np

from nanotulu import data

WORDS = ("the of and to in is was for on that with as by at from his her it an are were which be this has had not "
         "but they have or one all their there been more when will would who so if out no can into than them only "
         "what 12 47 2024 answer question because number equal plus minus times think step first then").split()


def synthetic_rows(n, turns, seed=0):
    rng = np.random.default_rng(seed)

    def text(mean):
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=max(1, int(rng.exponential(mean)))))

    for _ in range(n):
        msgs = [{"role": "system", "content": text(10)}]
        for _ in range(turns):
            msgs += [{"role": "user", "content": text(30)}, {"role": "assistant", "content": text(60)}]
        yield {"messages": msgs}


def bpe_tokenizer(directory, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + ["<|user|>\n<|assistant|>\n<|system|>\n"]
    tok.train_from_iterator(corpus * 10, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return data.load_tokenizer(directory)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--turns", type=int, default=3, help="user/assistant exchanges per row")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--tokenizer", default="bpe", choices=["bpe", "byte"])
    ap.add_argument("--vocab", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sft.jsonl")
        with open(path, "w") as f:
            for row in synthetic_rows(args.rows, args.turns):
                f.write(json.dumps(row) + "\n")
        tok = bpe_tokenizer(tmp, args.vocab) if args.tokenizer == "bpe" else data.load_tokenizer("byte")
        cache = os.path.join(tmp, "cache")
        runs = [("before: 1 process, every prefix encoded", 0, "", False),
                ("1 process, incremental prefixes", 0, "", True),
                (f"{args.workers} workers + incremental, writing the cache", args.workers, cache, True),
                ("cache hit (later starts, other ranks)", 0, cache, True)]
        results = []
        whole = data.tokenize_sft
        for name, workers, cache_dir, incremental in runs:
            # the "before" rows: tokenize_sft as it was, every prefix of a conversation encoded whole (in-process)
            data.tokenize_sft = whole if incremental else functools.partial(whole, incremental=False)
            t = time.perf_counter()
            examples, stats = data.load_sft_dataset([(path, None)], tok, "tulu", max_len=4096, workers=workers,
                                                    cache_dir=cache_dir)
            seconds = time.perf_counter() - t
            results.append(examples)
            print(f"{name:<50} {seconds:8.2f} s  ({args.rows / seconds:9.0f} rows/s)", flush=True)
        data.tokenize_sft = whole
        assert all(r == results[0] for r in results)
        mib = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache)) / 2**20
        print(f"{args.rows} rows of {1 + 2 * args.turns} messages, {stats['tokens'] / args.rows:.0f} tokens per row "
              f"({args.tokenizer}), cache {mib:.0f} MiB, {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
