"""DPO at scale: the reference-model fingerprint reads no weights yet changes with them, and each optimizer step
holds exactly --batch_pairs pairs over all ranks, whatever their lengths."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

from nanotulu import data
from nanotulu.model import LlamaConfig, build_model
from nanotulu.algos.dpo import DPOParams, file_fingerprint
from nanotulu.pairs import pair_docs, pair_length

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)


def test_fingerprint_changes_with_a_weight_not_with_a_faithful_copy(tmp_path):
    from safetensors.torch import load_file, save_file

    a = tmp_path / "a"
    build_model(TINY, seed=0).save_pretrained(str(a))
    key = file_fingerprint(str(a))
    assert file_fingerprint(str(a)) == key
    b = tmp_path / "b"
    shutil.copytree(a, b)  # copy2: contents and times kept -> same key (no recompute after moving a checkpoint)
    assert file_fingerprint(str(b)) == key
    # one weight changed in place: same size, same header, only the bytes (and so the file's time) differ
    path = str(b / "model.safetensors")
    st = os.stat(path)
    sd = load_file(path)
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1.0
    save_file(sd, path, metadata={"format": "pt"})
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # as a later write would (coarse clocks too)
    assert os.path.getsize(path) == st.st_size
    assert file_fingerprint(str(b)) != key
    # config changes count too
    c = tmp_path / "c"
    shutil.copytree(a, c)
    cfg = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    assert file_fingerprint(str(c)) != key


def fake_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        lc, lr = rng.integers(3, 60, size=2)
        pairs.append({"chosen": {"input_ids": [1] * int(lc), "labels": [1] * int(lc)},
                      "rejected": {"input_ids": [2] * int(lr), "labels": [2] * int(lr)}, "id": i})
    return pairs


def test_every_step_holds_exactly_batch_pairs_split_over_ranks():
    pairs, batch, capacity = fake_pairs(103), 16, 128
    for world in (1, 2, 3):
        loaders = [data.CountedLoader(pairs, batch, capacity, rank=r, world_size=world, seed=5, pad_id=0,
                                      length_fn=pair_length, to_docs=pair_docs, backend="python") for r in range(world)]
        assert len(loaders[0]) == 103 // batch
        for epoch in range(2):
            seen = []
            epochs = [list(ld) for ld in loaders]  # each rank's steps of one epoch
            assert len({len(e) for e in epochs}) == 1
            for step_rows in zip(*epochs):  # one optimizer step: each rank's rows
                assert len({len(rows) for rows in step_rows}) == 1  # same number of forwards on every rank
                ids = [i for rows in step_rows for row in rows for i in row["example_ids"]]
                assert len(ids) == len(set(ids)) == batch  # exactly batch_pairs distinct pairs, over all ranks
                for rows in step_rows:
                    for row in rows:
                        used = sum(pair_length(pairs[i]) for i in row["example_ids"])
                        assert int(row["cu_seqlens"][2 * len(row["example_ids"])]) == used <= capacity
                seen += ids
            assert len(seen) == len(set(seen)) == len(loaders[0]) * batch  # an epoch: no pair twice
            assert all(ld.epoch == epoch + 1 for ld in loaders)
    # resume: a fresh loader loaded with the state after step 2 yields what the original yields next
    a = data.CountedLoader(pairs, batch, capacity, rank=1, world_size=2, seed=5, pad_id=0, length_fn=pair_length,
                           to_docs=pair_docs, backend="python")
    it = iter(a)
    next(it), next(it)
    b = data.CountedLoader(pairs, batch, capacity, rank=1, world_size=2, seed=5, pad_id=0, length_fn=pair_length,
                           to_docs=pair_docs, backend="python")
    b.load_state_dict(a.state_dict())
    assert [r["example_ids"] for r in next(it)] == [r["example_ids"] for r in next(iter(b))]


def test_dpo_run_logs_batch_pairs_every_step(tmp_path):
    model_dir = tmp_path / "tiny"
    build_model(TINY, seed=3).save_pretrained(str(model_dir))
    rows = []
    for i in range(24):
        p = [{"role": "user", "content": f"What is {i % 7} + {i % 5}?" + " Please." * (i % 4)}]
        rows.append({"chosen": p + [{"role": "assistant", "content": f"{i % 7 + i % 5}."}],
                     "rejected": p + [{"role": "assistant", "content": "No idea at all, sorry." * (1 + i % 3)}]})
    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    env = dict(os.environ, NANOTULU_NO_BAR="1")
    subprocess.run([sys.executable, "-m", "nanotulu.train_dpo", "--model", str(model_dir), "--tokenizer", "byte",
                    "--data", str(f), "--output_dir", str(out), "--max_seq_len", "160", "--batch_pairs", "6",
                    "--max_steps", "3", "--save_every", "0", "--loss_impl", "torch",
                    "--ref_cache_dir", str(tmp_path / "cache")], env=env, check=True, capture_output=True, timeout=300)
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["pairs"] for r in logged] == [6.0] * 3


def test_an_all_padding_row_adds_nothing():
    """A rank short of rows runs an all-padding row (no pair): the step's gradient is that of the real rows alone."""
    from test_dpo import make_pairs, packed_batch

    from nanotulu.algos.dpo import dpo_backward

    tok, pairs = make_pairs(3)
    model = build_model(TINY, seed=2)
    ref = torch.randn(len(pairs), 2) * 5 - 60
    kw = DPOParams(loss_type="dpo_norm", beta=5.0)
    batch = packed_batch(tok, pairs, capacity=384)
    dpo_backward(model, [batch], lambda m: ref[m["pair_ids"]], kw, impl="torch")
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    empty = data.make_row([], 384, tok.pad_token_id)
    empty["example_ids"] = []
    sums, n_pairs = dpo_backward(model, [data.stack_pair_rows([empty], "cpu"), batch], lambda m: ref[m["pair_ids"]],
                                 kw, impl="torch")
    assert n_pairs.item() == 3
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-6, atol=1e-8, msg=n)
