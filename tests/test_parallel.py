"""parallel.py on CPU with gloo: FSDP2 (dp=2), tensor + sequence parallel with the vocab-parallel loss (tp=2), and
both (dp=2 x tp=2) each give the SFT and DPO step of a single process (loss, every gradient, the optimizer step,
the gathered Hugging Face export); a killed multi-process torchrun SFT run resumes to the uninterrupted losses; bad
meshes, shapes and checkpoints are refused with a clear message. fp32 throughout (the GPU runs bf16 parameters with
fp32 reduction: not exercised here)."""

import json
from dataclasses import replace
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard

from nanotulu import checkpoint, data, parallel, run
from nanotulu.model import LlamaConfig, build_model
from nanotulu.data import stack_pair_rows, stack_rows
from nanotulu.algos.dpo import DPOParams, dpo_backward, pair_logps
from nanotulu.algos.sft import sft_backward
from nanotulu.pairs import pair_docs, tokenize_pair

from test_sft import write_fixture  # noqa: E402 (tests/ is on sys.path under pytest): the torchrun SFT fixture

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)

CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Bye!"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3."}],
]
OTHER_ANSWERS = ["7", "Go away.", "Seven.", "3, 2, 1, go"]


def sft_rows(tok):
    """Four rows of one example each (different token counts, so the "sum" loss's global count matters)."""
    return [data.make_row([data.tokenize_sft(m, tok)], 128, tok.pad_token_id) for m in CHATS]


def dpo_rows(tok):
    rows = []
    for i, (m, other) in enumerate(zip(CHATS, OTHER_ANSWERS)):
        pair = tokenize_pair({"chosen": m, "rejected": m[:-1] + [{"role": "assistant", "content": other}]}, tok,
                             "tulu", 128, True, f"pair {i}")
        row = data.make_row(pair_docs(pair), 256, tok.pad_token_id)
        row["example_ids"] = [i]
        rows.append(row)
    return rows


def unwrap_name(name):
    return name.replace("_checkpoint_wrapped_module.", "")


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def assert_grads_close(model, ref_grads, what):
    for name, p in model.named_parameters():
        g, r = full(p.grad), ref_grads[unwrap_name(name)]
        err = (g - r).norm() / r.norm().clamp(min=1e-12)
        assert err <= 1e-5, f"{what}: gradient of {name} differs from one process by {err:.2e} (relative)"


def _worker(rank, world, port, dp, tp, tied, ac, out_dir):
    torch.set_num_threads(1)
    cfg = replace(TINY, tie_word_embeddings=tied)
    tok = data.load_tokenizer("byte")
    s_rows, d_rows = sft_rows(tok), dpo_rows(tok)
    # the single-process reference, on the whole batch, before the process group exists (so nothing is reduced)
    ref = _reference(cfg, s_rows, d_rows)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _check_steps(rank, world, dp, tp, ac, cfg, s_rows, d_rows, ref, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reference(cfg, s_rows, d_rows):
    ref = build_model(cfg, seed=1)
    ref_loss, ref_tokens = sft_backward(ref, [stack_rows(s_rows, "cpu")], impl="torch")
    ref_sft_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref.zero_grad(set_to_none=True)
    whole = stack_pair_rows(d_rows, "cpu")
    with torch.no_grad():  # reference log-probs near the policy's, so the DPO loss is not saturated
        pi0, _ = pair_logps(ref, whole, "torch")
    ref_table = pi0 + 0.5 * torch.randn(pi0.shape, generator=torch.Generator().manual_seed(0))
    kw = dict(loss_type="dpo_norm", beta=5.0)
    ref_dpo, ref_pairs = dpo_backward(ref, [whole], lambda m: ref_table[m["pair_ids"]], DPOParams(**kw), impl="torch")
    ref_dpo_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_norm = parallel.clip_grad_norm(ref, 1.0)
    torch.optim.SGD(ref.parameters(), lr=1.0).step()  # linear in the gradient (Adam would blow up 1e-7 noise on ~0 gradients)
    return dict(model=ref, sft_loss=ref_loss, sft_tokens=ref_tokens, sft_grads=ref_sft_grads, ref_table=ref_table,
                dpo=ref_dpo, dpo_pairs=ref_pairs, dpo_grads=ref_dpo_grads, norm=ref_norm, kw=kw)


def _check_steps(rank, world, dp, tp, ac, cfg, s_rows, d_rows, r, out_dir):
    ref, ref_table, kw = r["model"], r["ref_table"], r["kw"]
    # --- the same steps on the mesh ----------------------------------------------------------------------------
    mesh = parallel.build_mesh(world, dp, tp, "cpu")
    model = parallel.parallelize(build_model(cfg, seed=1), mesh, activation_checkpointing=ac, seq_len=256)
    dp_rank, dp_world = parallel.dp_coords(mesh, rank, world)
    assert (dp_world, mesh["tp"].size()) == (dp, tp)
    if tp > 1:  # the output weight (the embedding when tied) is split over the vocabulary on the tp dim
        w = model.output_weight
        assert w.device_mesh.mesh_dim_names == ("dp", "tp") and w.placements[1] == Shard(0), w.placements
    mine = stack_rows(s_rows[dp_rank::dp_world], "cpu")  # the loader gives each dp rank its own rows
    # the mesh runs the default (chunked loss-fused, vocab-parallel under tp) path; the reference the 8NHV torch one
    loss, n_tokens = sft_backward(model, [mine], impl="auto", mesh=mesh)
    loss = parallel.all_reduce_sum(loss, parallel.dp_group(mesh))
    assert int(n_tokens) == int(r["sft_tokens"]), (n_tokens, r["sft_tokens"])
    torch.testing.assert_close(loss, r["sft_loss"], rtol=1e-5, atol=1e-5, msg="SFT loss")
    assert_grads_close(model, r["sft_grads"], "SFT")
    model.zero_grad(set_to_none=True)

    mine = stack_pair_rows(d_rows[dp_rank::dp_world], "cpu")
    sums, n_pairs = dpo_backward(model, [mine], lambda m: ref_table[m["pair_ids"]], DPOParams(**kw), impl="auto",
                                 mesh=mesh)
    sums = parallel.all_reduce_sum(sums, parallel.dp_group(mesh))
    assert int(n_pairs) == int(r["dpo_pairs"]) == len(d_rows)
    torch.testing.assert_close(sums, r["dpo"], rtol=1e-5, atol=1e-5, msg="DPO loss and metrics")
    assert_grads_close(model, r["dpo_grads"], "DPO")
    norm = parallel.clip_grad_norm(model, 1.0)
    torch.testing.assert_close(norm, r["norm"], rtol=1e-5, atol=1e-6, msg="gradient norm")
    torch.optim.SGD(model.parameters(), lr=1.0).step()

    # --- one Hugging Face checkpoint gathered from the shards, loaded by transformers -------------------------
    hf_dir = os.path.join(out_dir, "hf")
    checkpoint.save_hf(model, hf_dir, rank=rank)
    if rank == 0:
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        hf_sd = hf.state_dict()
        for name, p in ref.state_dict().items():
            torch.testing.assert_close(hf_sd[name], p, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"exported {name}: {m}")
        ids = torch.tensor(s_rows[1]["input_ids"][:40])[None]
        torch.testing.assert_close(hf(ids).logits.float(), ref.logits(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dp,tp,tied,ac", [(2, 1, True, False), (1, 2, True, False), (2, 2, False, True)],
                         ids=["dp2", "tp2", "dp2xtp2"])
def test_sft_and_dpo_step_match_one_process(dp, tp, tied, ac, tmp_path):
    torch.multiprocessing.spawn(_worker, args=(dp * tp, run.free_port(), dp, tp, tied, ac, str(tmp_path)),
                                nprocs=dp * tp, join=True)


# ---- a torchrun SFT run on 2 processes, killed and resumed ---------------------------------------------------------


def torchrun_sft(nproc, args, check=True):
    env = dict(os.environ, NANOTULU_NO_BAR="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nanotulu.train_sft", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_torchrun_killed_run_resumes_bit_for_bit(tmp_path):
    model_dir, data_path = write_fixture(tmp_path)
    common_args = ["--model", model_dir, "--tokenizer", "byte", "--data", data_path, "--max_seq_len", "128",
                   "--batch_rows", "4", "--lr", "1e-3", "--max_steps", "5", "--save_every", "2", "--seed", "7",
                   "--loss_impl", "torch", "--dp_shard", "2", "--tp", "1"]
    torchrun_sft(2, [*common_args, "--output_dir", str(tmp_path / "a")])
    killed = torchrun_sft(2, [*common_args, "--output_dir", str(tmp_path / "b"), "--exit_after_steps", "3"],
                          check=False)
    assert killed.returncode != 0 and not os.path.exists(tmp_path / "b" / "final"), killed.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step_00000002"]
    torchrun_sft(2, [*common_args, "--output_dir", str(tmp_path / "b")])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 6))
    # steps 1-2 ran before the kill; 3 was lost with it; 3-5 re-ran from the step-2 checkpoint: same losses, exactly
    for step in range(1, 6):
        assert a[step] == b[step], (step, a[step], b[step])
    from nanotulu.model import Llama
    ma, mb = Llama.from_pretrained(str(tmp_path / "a" / "final")), Llama.from_pretrained(str(tmp_path / "b" / "final"))
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(p, q), n

    # the run (dp=2) is refused by a run on another mesh of the same 2 processes, before any step: its saved flags
    # (run_config.json) name the mesh flags that differ
    other = torchrun_sft(2, [*common_args, "--output_dir", str(tmp_path / "b"), "--dp_shard", "1", "--tp", "2",
                             "--max_steps", "6"], check=False)
    assert other.returncode != 0 and "--dp_shard 2 there, 1 now" in other.stderr and "--tp 1 there, 2 now" in \
        other.stderr, other.stderr[-3000:]


# ---- bad input: refused before any work ---------------------------------------------------------------------------


def test_bad_mesh_flags_and_shapes_are_refused():
    with pytest.raises(ValueError, match="world size must equal dp_shard x tp"):
        parallel.build_mesh(4, 3, 2, "cpu")
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        parallel.build_mesh(3, -1, 2, "cpu")
    with pytest.raises(ValueError, match="num_key_value_heads = 2"):
        parallel.check_tp_shapes(TINY, 4)
    with pytest.raises(ValueError, match="vocab_size = 263"):
        parallel.check_tp_shapes(replace(TINY, vocab_size=263), 2)
    with pytest.raises(ValueError, match="intermediate_size = 65.*row capacity.* = 129"):
        parallel.check_tp_shapes(replace(TINY, intermediate_size=65), 2, seq_len=129)
    parallel.check_tp_shapes(TINY, 2, seq_len=128)


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    model = build_model(TINY, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    path = checkpoint.save_checkpoint(str(tmp_path), 1, model, opt, {}, rank=0)
    other = build_model(replace(TINY, intermediate_size=96), seed=0)
    with pytest.raises(ValueError, match=r"another shape: intermediate_size 64 \(this run: 96\)"):
        checkpoint.load_checkpoint(path, other, torch.optim.AdamW(other.parameters()), rank=0, world_size=1)
