"""Reward model: the exported checkpoint against transformers' LlamaForSequenceClassification, packed pair rewards
against one sequence at a time, and the Bradley-Terry step against a plain float64 reference."""

import torch
import torch.nn.functional as F

from nanotulu import data
from nanotulu.data import stack_pair_rows
from nanotulu.model import Llama, LlamaConfig, build_model
from nanotulu.algos.rm import RM_SUMS, pair_rewards, rm_backward
from nanotulu.pairs import load_pairs, pair_docs

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)


def make_pairs(tmp_path, n):
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"What is {i} + {i + 2}?"}]
        rows.append({"chosen": prompt + [{"role": "assistant", "content": f"It is {2 * i + 2}."}],
                     "rejected": prompt + [{"role": "assistant", "content": f"Maybe {i * 3 + 1}, or not at all."}]})
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    tok = data.load_tokenizer("byte")
    pairs, _ = load_pairs([(str(path), None)], tok, "tulu", 128, True, 0)
    return tok, pairs


def reward_model(tmp_path):
    """A causal LM saved, then loaded as a reward model (lm_head dropped, a score head drawn)."""
    build_model(TINY, seed=1).save_pretrained(str(tmp_path / "lm"))
    return Llama.from_pretrained(str(tmp_path / "lm"), dtype=torch.float32, score_head=True)


def test_export_loads_in_transformers_with_same_scores(tmp_path):
    from transformers import LlamaForSequenceClassification

    tok, pairs = make_pairs(tmp_path, 3)
    rm = reward_model(tmp_path)
    assert rm.lm_head is None and rm.score is not None
    rm.cfg.pad_token_id = tok.pad_token_id
    rm.save_pretrained(str(tmp_path / "rm"))
    hf = LlamaForSequenceClassification.from_pretrained(str(tmp_path / "rm"), dtype=torch.float32).eval()
    again = Llama.from_pretrained(str(tmp_path / "rm"))  # read back as a reward model by itself
    assert again.score is not None
    with torch.no_grad():
        for p in pairs:
            for doc in pair_docs(p):
                ids = torch.tensor(doc["input_ids"])[None]
                want = hf(ids).logits[0, 0]  # transformers reads the last non-pad token
                ours = rm.logits(ids)[0, -1, 0]
                torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(again.logits(ids)[0, -1, 0], want, rtol=1e-5, atol=1e-5)


def test_packed_pair_rewards_equal_one_sequence_at_a_time(tmp_path):
    tok, pairs = make_pairs(tmp_path, 4)
    rm = reward_model(tmp_path)
    row = data.make_row([d for p in pairs for d in pair_docs(p)], 512, tok.pad_token_id)
    row["example_ids"] = [p["id"] for p in pairs]
    with torch.no_grad():
        r = pair_rewards(rm, stack_pair_rows([row], "cpu"))
        for i, p in enumerate(pairs):
            for j, doc in enumerate(pair_docs(p)):
                want = rm.logits(torch.tensor(doc["input_ids"])[None])[0, -1, 0]
                torch.testing.assert_close(r[i, j], want, rtol=1e-5, atol=1e-5)


def test_bradley_terry_step_equals_plain_float64(tmp_path):
    """rm_backward over two micro-batches == mean over all pairs of -log sigmoid(r_c - r_r), one sequence at a time
    in float64: loss, accuracy and every parameter's gradient."""
    tok, pairs = make_pairs(tmp_path, 5)
    rm = reward_model(tmp_path)
    rows = []
    for chunk in (pairs[:2], pairs[2:]):
        row = data.make_row([d for p in chunk for d in pair_docs(p)], 512, tok.pad_token_id)
        row["example_ids"] = [p["id"] for p in chunk]
        rows.append(row)
    sums, n_pairs = rm_backward(rm, [stack_pair_rows([r], "cpu") for r in rows])
    got = {n: p.grad.clone() for n, p in rm.named_parameters()}
    rm.zero_grad()

    ref = rm.double()
    r = torch.stack([torch.stack([ref.logits(torch.tensor(d["input_ids"])[None])[0, -1, 0] for d in pair_docs(p)])
                     for p in pairs])  # (P, 2)
    loss = (-F.logsigmoid(r[:, 0] - r[:, 1])).mean()
    loss.backward()
    s = dict(zip(RM_SUMS, sums / n_pairs))
    assert n_pairs.item() == len(pairs)
    assert abs(s["loss"].item() - loss.item()) < 1e-5
    assert abs(s["accuracy"].item() - (r[:, 0] > r[:, 1]).double().mean().item()) < 1e-6
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n].double(), p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item())
