"""--eval_data / --eval_every: the held-out metrics a short SFT and DPO run log with their training metrics equal
the same metrics computed from full logits, example by example, on the exported final model."""

import json
import os

import torch

from nanotulu import data, train_dpo, train_sft
from nanotulu.model import Llama, LlamaConfig, build_model
from nanotulu.algos.dpo import dpo_loss
from nanotulu.pairs import tokenize_pair

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def chat(i):
    return {"messages": [{"role": "user", "content": f"What is {i % 7} + {i % 5}?"},
                         {"role": "assistant", "content": f"{i % 7} + {i % 5} = {i % 7 + i % 5}."}]}


def test_sft_held_out_loss(tmp_path):
    model_dir = str(tmp_path / "tiny")
    build_model(TINY, seed=3).save_pretrained(model_dir)
    train, held = write(tmp_path / "train.jsonl", [chat(i) for i in range(24)]), write(
        tmp_path / "held.jsonl", [chat(100 + i) for i in range(5)])
    final = train_sft.main(["--model", model_dir, "--tokenizer", "byte", "--data", train, "--eval_data", held,
                            "--eval_every", "2", "--output_dir", str(tmp_path / "sft"), "--max_seq_len", "128",
                            "--batch_rows", "2", "--max_steps", "3", "--lr", "1e-3", "--save_every", "0",
                            "--loss_impl", "torch", "--data_cache_dir", ""], finish=False)
    rows = read_metrics(tmp_path / "sft")
    assert [("eval/loss" in r) for r in rows] == [False, True, True]  # step 2, and the last step
    tok = data.load_tokenizer("byte")
    model = Llama.from_pretrained(final)
    total, n = 0.0, 0
    for i in range(5):
        ex = data.tokenize_sft(chat(100 + i)["messages"], tok)
        logits = model.logits(torch.tensor([ex["input_ids"]]))[0].double()
        labels = torch.tensor(ex["labels"][1:])
        total += torch.nn.functional.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum").item()
        n += int((labels != -100).sum())
    assert abs(rows[-1]["eval/loss"] - total / n) < 1e-4 * total / n


def pref(i):
    p = [{"role": "user", "content": f"What is {i % 7} + {i % 5}?" + " Please." * (i % 3)}]
    return {"chosen": p + [{"role": "assistant", "content": f"{i % 7 + i % 5}."}],
            "rejected": p + [{"role": "assistant", "content": "No idea, sorry." * (1 + i % 2)}]}


def answer_logp(model, doc):
    logp = torch.log_softmax(model.logits(torch.tensor([doc["input_ids"]]))[0, :-1].double(), -1)
    labels = torch.tensor(doc["labels"][1:])
    mask = labels != -100
    return logp[mask].gather(1, labels[mask][:, None]).sum(), mask.sum().double()


def test_dpo_held_out_rewards(tmp_path):
    model_dir = str(tmp_path / "tiny")
    build_model(TINY, seed=4).save_pretrained(model_dir)
    train, held = write(tmp_path / "train.jsonl", [pref(i) for i in range(12)]), write(
        tmp_path / "held.jsonl", [pref(50 + i) for i in range(5)])
    final = train_dpo.main(["--model", model_dir, "--tokenizer", "byte", "--data", train, "--eval_data", held,
                            "--output_dir", str(tmp_path / "dpo"), "--max_seq_len", "128", "--batch_pairs", "4",
                            "--max_steps", "2", "--lr", "1e-3", "--save_every", "0", "--loss_impl", "torch",
                            "--ref_cache_dir", str(tmp_path / "ref"), "--data_cache_dir", ""], finish=False)
    rows = read_metrics(tmp_path / "dpo")
    assert "eval/rewards/accuracy" not in rows[0]  # --eval_every 0: at the end only
    tok = data.load_tokenizer("byte")
    policy, reference = Llama.from_pretrained(final), Llama.from_pretrained(model_dir)
    losses, rc, rr = [], [], []
    with torch.no_grad():
        for i in range(5):
            pair = tokenize_pair(pref(50 + i), tok, "tulu", 128, True, "held")
            (pc, nc), (pr, nr) = answer_logp(policy, pair["chosen"]), answer_logp(policy, pair["rejected"])
            (qc, _), (qr, _) = answer_logp(reference, pair["chosen"]), answer_logp(reference, pair["rejected"])
            loss, c, r = dpo_loss(pc[None], pr[None], qc[None], qr[None], nc[None], nr[None], loss_type="dpo_norm",
                                  beta=5.0)
            losses.append(loss.item()), rc.append(c.item()), rr.append(r.item())
    want = {"eval/loss": sum(losses) / 5, "eval/rewards/accuracy": sum(c > r for c, r in zip(rc, rr)) / 5,
            "eval/rewards/margin": sum(c - r for c, r in zip(rc, rr)) / 5}
    for k, v in want.items():
        assert abs(rows[-1][k] - v) < 1e-4 * max(1.0, abs(v)), (k, rows[-1][k], v)
    assert rows[-1]["pairs"] == 4
