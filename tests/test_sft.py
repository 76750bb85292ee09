"""SFT trainer: packed loss == one-by-one loss, Tulu 3 "sum" semantics under gradient accumulation, and a killed
run resumed from its checkpoint reproducing the uninterrupted losses."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanotulu import data
from nanotulu.model import LlamaConfig, build_model
from nanotulu.data import stack_rows
from nanotulu.algos.sft import sft_backward

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)

CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Bye!"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3."}],
]


def examples():
    tok = data.load_tokenizer("byte")
    return tok, [data.tokenize_sft(m, tok) for m in CHATS]


def reference_loss_sum(model, ex):
    """Plain full-logits cross-entropy of one example on its own: sum over its trained tokens (fp32)."""
    ids = torch.tensor(ex["input_ids"])[None]
    labels = torch.tensor(ex["labels"])
    logits = model.logits(ids)[0]  # (T, V)
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("impl", ["auto", "fused", "triton", "torch"])
def test_packed_loss_equals_one_by_one(impl):
    # auto / torch: the chunked fused loss with torch rows (CPU); fused: with the Triton row kernels (interpreted);
    # triton: the tile kernels (8NHV)
    torch.manual_seed(0)
    tok, exs = examples()
    model = build_model(TINY, seed=1)
    row = data.make_row(exs, 256, tok.pad_token_id)
    loss_sum, n_tokens = sft_backward(model, [stack_rows([row], "cpu")], impl=impl)
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    n_ref = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in exs)
    ref_sum = sum(reference_loss_sum(model, ex) for ex in exs)
    (ref_sum / n_ref).backward()
    assert int(n_tokens) == n_ref
    torch.testing.assert_close(loss_sum, ref_sum.detach(), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_sum_semantics_with_gradient_accumulation():
    """One step of 4 rows at once == 4 micro-steps of 1 row: every token weighs 1/(tokens of the whole step),
    however the rows are split (a per-micro-batch mean would weigh short rows' tokens more)."""
    tok, exs = examples()
    rows = [data.make_row([ex], 128, tok.pad_token_id) for ex in exs]  # 4 rows of very different token counts
    model = build_model(TINY, seed=2)
    sft_backward(model, [stack_rows(rows, "cpu")], impl="torch")
    one_step = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sft_backward(model, [stack_rows([r], "cpu") for r in rows], impl="torch")
    for n, p in model.named_parameters():
        torch.testing.assert_close(one_step[n], p.grad, rtol=1e-6, atol=1e-7, msg=n)
    # and both equal the formula: sum of all token losses / all trained tokens
    model.zero_grad()
    n_all = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in exs)
    (sum(reference_loss_sum(model, ex) for ex in exs) / n_all).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(one_step[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def write_fixture(tmp_path):
    model_dir = tmp_path / "tiny"
    build_model(TINY, seed=3).save_pretrained(str(model_dir))
    data_path = tmp_path / "chat.jsonl"
    with open(data_path, "w") as f:
        for i in range(48):
            a, b = i % 7, i % 5
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                             {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}) + "\n")
    return str(model_dir), str(data_path)


def run_sft(args, check=True):
    env = dict(os.environ, NANOTULU_NO_BAR="1")
    return subprocess.run([sys.executable, "-m", "nanotulu.train_sft", *args], env=env, capture_output=True,
                          text=True, check=check, timeout=300)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_killed_run_resumes_to_the_same_losses(tmp_path):
    model_dir, data_path = write_fixture(tmp_path)
    common = ["--model", model_dir, "--tokenizer", "byte", "--data", data_path, "--max_seq_len", "128",
              "--batch_rows", "2", "--lr", "1e-3", "--max_steps", "6", "--save_every", "2", "--seed", "7"]
    run_sft([*common, "--output_dir", str(tmp_path / "a")])
    killed = run_sft([*common, "--output_dir", str(tmp_path / "b"), "--exit_after_steps", "3"], check=False)
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert not os.path.exists(tmp_path / "b" / "final")
    run_sft([*common, "--output_dir", str(tmp_path / "b")])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 7))
    # steps 1-3 ran before the kill; step 3 was lost with it and 3-6 re-ran from the step-2 checkpoint
    for step in range(1, 7):
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert a[6] < a[1]
    # the final HF checkpoint of the resumed run equals the uninterrupted one
    from nanotulu.model import Llama
    ma, mb = Llama.from_pretrained(str(tmp_path / "a" / "final")), Llama.from_pretrained(str(tmp_path / "b" / "final"))
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
