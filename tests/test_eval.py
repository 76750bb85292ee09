"""nanotulu.eval: answers equal transformers' greedy generate on each prompt alone (no batching, no padding), scores
are the verifier's on those answers, and the command line writes its table and JSON; bad input fails early."""

import json

import pytest
import torch

from nanotulu.data import ByteTokenizer
from nanotulu.eval import evaluate, main
from nanotulu.model import LlamaConfig, build_model

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=264, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, rope_theta=10000.0)
QUESTIONS = ["What is 2+2?", "Name a color.", "Hi", "Write a long story about a cat and a dog please."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_model(LlamaConfig(**CFG), seed=0)
    model.init_weights(seed=0, std=0.25)  # peaked next-token distributions: greedy has no near-ties
    path = tmp_path_factory.mktemp("eval") / "model"
    model.save_pretrained(str(path))
    return model, str(path)


def reference_answers(path, questions, max_new_tokens):
    """transformers' greedy generate, one prompt at a time, prompt rendered with the tulu template by hand."""
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    tok = ByteTokenizer()
    answers = []
    for q in questions:
        ids = torch.tensor([list(f"<|user|>\n{q}\n<|assistant|>\n".encode())])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id) + 1]
        known = [i for i in new if i < 256 + len(tok.SPECIALS)]  # ids past the tokenizer's (embedding padding)
        answers.append((tok.decode(known, skip_special_tokens=True), new[-1] == tok.eos_token_id, len(new)))
    return answers


def rows_for(answers):
    # string_match rows: right for questions 0 and 2 (the reference answer), wrong for 1; gsm8k row: wrong number
    return [
        dict(prompt_messages=[{"role": "user", "content": QUESTIONS[0]}], ground_truth=answers[0][0] or "x",
             dataset="string_match"),
        dict(prompt_messages=[{"role": "user", "content": QUESTIONS[1]}], ground_truth="certainly not this",
             dataset="string_match"),
        dict(prompt_messages=[{"role": "user", "content": QUESTIONS[2]}], ground_truth=answers[2][0] or "x",
             dataset="string_match"),
        dict(prompt_messages=[{"role": "user", "content": QUESTIONS[3]}], ground_truth="987654321",
             dataset="gsm8k"),
    ]


def test_evaluate_matches_transformers_answers_and_scores(checkpoint):
    model, path = checkpoint
    answers = reference_answers(path, QUESTIONS, max_new_tokens=12)
    assert all(a[0].strip() for a in answers[:3])  # non-empty texts: a string match is meaningful
    res = evaluate(model, ByteTokenizer(), rows_for(answers), batch_size=3, max_new_tokens=12, progress=False)
    for s, (text, stopped, n) in zip(res["samples"], answers):
        assert s["response"] == text
        assert s["finish_reason"] == ("stop" if stopped else "length") and s["new_tokens"] == n
    assert [s["score"] for s in res["samples"]] == [1.0, 0.0, 1.0, 0.0]
    assert res["datasets"]["string_match"]["n"] == 3
    assert res["datasets"]["string_match"]["score"] == pytest.approx(2 / 3)
    assert res["datasets"]["gsm8k"]["score"] == 0.0
    assert res["overall"]["score"] == pytest.approx(0.5)
    assert res["overall"]["mean_tokens"] == pytest.approx(sum(a[2] for a in answers) / 4)


def test_command_line_writes_table_and_json(checkpoint, tmp_path, capsys):
    _, path = checkpoint
    data = tmp_path / "rl.jsonl"
    with open(data, "w") as f:
        for q, gt in zip(QUESTIONS[:2], ["4", "blue"]):
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": "the reference, dropped"}]
            f.write(json.dumps({"messages": msgs, "ground_truth": gt, "dataset": "string_match"}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "1+1?"}], "ground_truth": "2",
                            "dataset": "gsm8k"}) + "\n")
    out = tmp_path / "res.json"
    main(["--model", path, "--tokenizer", "byte", "--data", str(data), "--out", str(out), "--max_new_tokens", "6",
          "--dtype", "float32", "--device", "cpu", "--verify_workers", "0", "--batch_size", "2"])
    printed = capsys.readouterr().out
    assert "string_match" in printed and "gsm8k" in printed and "overall" in printed
    saved = json.loads(out.read_text())
    assert saved["datasets"]["string_match"]["n"] == 2 and saved["datasets"]["gsm8k"]["n"] == 1
    assert [s["source"] for s in saved["samples"]] == [f"{data}:{i}" for i in (1, 2, 3)]
    # the prompt ends at the user turn: the dropped reference answer is not in the prompt
    want_len = len(f"<|user|>\n{QUESTIONS[0]}\n<|assistant|>\n".encode())
    assert saved["samples"][0]["prompt_tokens"] == want_len


class NoEosTokenizer(ByteTokenizer):
    def __init__(self):
        super().__init__()
        self.eos_token = self.eos_token_id = None


def test_bad_input_fails_before_generation(checkpoint, tmp_path):
    model, path = checkpoint
    row = dict(prompt_messages=[{"role": "user", "content": "hi"}], ground_truth="x", dataset="string_match")
    with pytest.raises(ValueError, match="no EOS"):
        evaluate(model, NoEosTokenizer(), [row], max_new_tokens=4, progress=False)
    long_row = dict(row, prompt_messages=[{"role": "user", "content": "y" * 200}], source="f.jsonl:7")
    with pytest.raises(ValueError, match="f.jsonl:7: the prompt has"):
        evaluate(model, ByteTokenizer(), [row, long_row], max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate(model, ByteTokenizer(), [row], max_new_tokens=0, progress=False)
    with pytest.raises(SystemExit, match="not a model directory"):
        main(["--model", str(tmp_path / "missing"), "--data", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit, match="no such file"):
        main(["--model", path, "--data", str(tmp_path / "x.jsonl")])


# Under torch.distributed (two CPU processes, gloo, FSDP2-sharded model) every rank gets the single-process results.
DIST_WORKER = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from nanotulu.data import ByteTokenizer
from nanotulu.eval import evaluate
from nanotulu.model import Llama
rank, init_file, path, rows, out = eval(sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
model = Llama.from_pretrained(path)
for block in model.model.layers.values():
    fully_shard(block)
fully_shard(model)
res = evaluate(model, ByteTokenizer(), rows, batch_size=2, max_new_tokens=6, progress=False)
torch.save(res, out)
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
"""


def test_distributed_evaluate_equals_single_process(checkpoint, tmp_path):
    import subprocess
    import sys

    model, path = checkpoint
    rows = [dict(prompt_messages=[{"role": "user", "content": q}], ground_truth="x", dataset="string_match")
            for q in QUESTIONS + ["one more", "and another"]]
    procs = [subprocess.Popen([sys.executable, "-c", DIST_WORKER, repr(
        (rank, str(tmp_path / "init"), path, rows, str(tmp_path / f"r{rank}.pt")))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    for p in procs:
        log = p.communicate(timeout=120)[0]
        assert p.returncode == 0, log
    want = evaluate(model, ByteTokenizer(), rows, batch_size=2, max_new_tokens=6, progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt")
        assert [s["response"] for s in got["samples"]] == [s["response"] for s in want["samples"]]
        assert got["datasets"] == want["datasets"]


def test_torchrun_tensor_parallel_eval_equals_single_process(checkpoint, tmp_path):
    """`torchrun --nproc_per_node 2 -m nanotulu.eval --tp 2`: the model TP-sharded, the weights gathered for
    generation; the JSON equals the single-process command's. Without torchrun, --tp 2 is refused clearly."""
    import os
    import subprocess
    import sys

    _, path = checkpoint
    data = tmp_path / "rl.jsonl"
    with open(data, "w") as f:
        for q in QUESTIONS + ["one more", "and another"]:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}], "ground_truth": "x",
                                "dataset": "string_match"}) + "\n")
    args = ["--model", path, "--tokenizer", "byte", "--data", str(data), "--max_new_tokens", "6", "--dtype",
            "float32", "--device", "cpu", "--verify_workers", "0", "--batch_size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "nanotulu.eval", *args, "--tp", "2", "--out", str(tmp_path / "tp.json")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    want = main(args + ["--out", str(tmp_path / "one.json")])
    got = json.loads((tmp_path / "tp.json").read_text())
    assert [s["response"] for s in got["samples"]] == [s["response"] for s in want["samples"]]
    assert got["datasets"] == want["datasets"] and got["config"]["tp"] == 2
    with pytest.raises(SystemExit, match="--tp 2: .*does not divide the world size 1"):
        main(args + ["--tp", "2"])
