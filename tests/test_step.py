"""The training step's speed switches, each against the plain path on CPU: per-block compile, fused AdamW, gradient
sync only on the last micro-batch (FSDP2 on gloo), one precision mechanism (no autocast on an FSDP-cast model),
HSDP on a (dp_replicate, dp_shard) mesh of 4 gloo processes against one process, and the DPO reference cache on
ranks that do not share a file system."""

import functools
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from nanotulu import data, parallel, run
from nanotulu.model import LlamaConfig, build_model
from nanotulu.algos.dpo import load_or_compute_ref
from nanotulu.algos.sft import sft_backward
from nanotulu.flags import TrainFlags, on_cuda_by_default

TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)


def packed_rows(n_rows, T=32, seed=0):
    """Rows of 1-3 random documents each (labels on every token), as the loader gives them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        lengths = torch.randint(4, 12, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        docs = [{"input_ids": torch.randint(0, 96, (n,), generator=g).tolist(),
                 "labels": torch.randint(0, 96, (n,), generator=g).tolist()} for n in lengths]
        rows.append(data.make_row(docs, T, pad_id=0))
    return rows


def grads(model):
    return {n.replace("_orig_mod.", ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()}


def assert_grads_close(got, want, what, rtol=1e-5):
    assert got.keys() == want.keys()
    for n in want:
        err = (got[n] - want[n]).norm() / want[n].norm().clamp(min=1e-12)
        assert err <= rtol, f"{what}: gradient of {n} differs by {err:.2e} (relative)"


def test_flags_on_cuda_by_default():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert on_cuda_by_default("auto", "compile", cuda) and not on_cuda_by_default("auto", "compile", cpu)
    assert on_cuda_by_default("true", "compile", cpu) and not on_cuda_by_default("false", "x", cuda)
    with pytest.raises(ValueError, match="--fused_adamw 'maybe': expected auto, true or false"):
        on_cuda_by_default("maybe", "fused_adamw", cpu)
    flags = TrainFlags()
    assert (flags.compile, flags.fused_adamw, flags.grad_sync, flags.dp_replicate) == ("auto", "auto", "last", 1)
    with pytest.raises(ValueError, match="--grad_sync 'sometimes'"):
        parallel.place(build_model(TINY), None, replace(flags, grad_sync="sometimes"), False)


def test_compiled_blocks_equal_eager(monkeypatch):
    """place() with --compile true compiles every block in place (HF state-dict names kept), with no graph break, and
    the SFT step's loss and gradients equal eager. The inductor's C++ build takes minutes on 2 CPU cores, so CI
    traces with aot_eager (dynamo capture + AOT autograd, what the inductor then lowers); NANOTULU_SLOW_TESTS=1
    runs the inductor."""
    from torch._dynamo.utils import counters

    if os.environ.get("NANOTULU_SLOW_TESTS") != "1":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    cfg = replace(TINY, num_hidden_layers=1)
    batch = data.stack_rows(packed_rows(2), "cpu")
    eager = build_model(cfg, seed=1)
    loss_e, _ = sft_backward(eager, [batch], impl="torch")
    model = parallel.place(build_model(cfg, seed=1), None, TrainFlags(compile="true"), False)
    assert all(b._compiled_call_impl is not None for b in model.model.layers.values())
    assert list(model.state_dict()) == list(eager.state_dict())
    loss_c, _ = sft_backward(model, [batch], impl="torch")
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    assert_grads_close(grads(model), grads(eager), "compiled block", rtol=1e-6)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    # auto on CPU: not compiled
    plain = parallel.place(build_model(cfg, seed=1), None, TrainFlags(), False)
    assert all(b._compiled_call_impl is None for b in plain.model.layers.values())


def test_fused_adamw_equals_foreach():
    models, opts = [], []
    for fused in ("true", "false"):
        m = build_model(TINY, seed=2)
        opt = run.make_optimizer(m, replace(TrainFlags(), fused_adamw=fused, lr=1e-2), torch.device("cpu"))
        assert opt.defaults["fused"] is (fused == "true")
        models.append(m)
        opts.append(opt)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        for p in zip(*(m.parameters() for m in models)):
            grad = torch.randn(p[0].shape, generator=g)
            for q in p:
                q.grad = grad.clone()
        for opt in opts:
            opt.step()
    for (n, a), (_, b) in zip(*(m.named_parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda msg, n=n: f"{n}: {msg}")


def test_precision_autocast_only_without_fsdp():
    m = build_model(TINY)
    with parallel.precision(m, True):
        assert torch.is_autocast_enabled("cpu")
    with parallel.precision(m, False):
        assert not torch.is_autocast_enabled("cpu")
    # (an FSDP model: in _fsdp_worker)


# ---- FSDP2 / HSDP on gloo ------------------------------------------------------------------------------------------


def _fsdp_worker(rank, world, port, dp_replicate):
    torch.set_num_threads(1)
    rows = packed_rows(8, seed=5)
    # the single-process reference: all 8 rows of the step, one micro-batch, before any process group exists
    ref = build_model(TINY, seed=4)
    ref_loss, ref_tokens = sft_backward(ref, [data.stack_rows(rows, "cpu")], impl="torch")
    ref_grads = grads(ref)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = parallel.build_mesh(world, -1, 1, "cpu", dp_replicate=dp_replicate)
        dp_rank, dp_world = parallel.dp_coords(mesh, rank, world)
        assert dp_world == world
        mine = rows[dp_rank::dp_world]  # the loader's split; two micro-batches per rank
        micro = data.micro_batches(mine, len(mine) // 2, "cpu")
        got = {}
        for sync in ("every", "last"):
            flags = replace(TrainFlags(), grad_sync=sync, dp_replicate=dp_replicate)
            model = parallel.place(build_model(TINY, seed=4), mesh, flags, use_bf16=False)
            p0 = next(iter(model.parameters()))
            if dp_replicate > 1:  # HSDP: replicated over dp_replicate, sharded over dp_shard
                assert p0.device_mesh.mesh_dim_names == ("dp_replicate", "dp_shard")
                assert p0.placements == (Replicate(), Shard(0)), p0.placements
            with parallel.precision(model, True):  # an FSDP model computes in its policy's dtype: no autocast
                assert not torch.is_autocast_enabled("cpu")
            # after the first micro-batch's backward, "last" has reduced nothing (no sharded .grad yet)
            it = parallel.grad_sync_on_last(model, micro)
            first = next(it)
            n_tok = torch.tensor(float(sum((m["targets"] != -100).sum() for m in micro)))
            parallel.all_reduce_sum(n_tok, parallel.dp_group(mesh))
            assert int(n_tok) == int(ref_tokens)
            loss = model(first["input_ids"], first["position_ids"], first["cu_seqlens"],
                         max_seqlen=first["max_seqlen"], head=_ce_head(first))
            (loss * dp_world / n_tok).backward()
            reduced = [p.grad is not None for p in model.parameters()]
            assert all(reduced) if sync == "every" else not any(reduced), (sync, reduced)
            for m in it:
                loss = model(m["input_ids"], m["position_ids"], m["cu_seqlens"], max_seqlen=m["max_seqlen"],
                             head=_ce_head(m))
                (loss * dp_world / n_tok).backward()
            got[sync] = grads(model)
            assert_grads_close(got[sync], ref_grads, f"dp_replicate={dp_replicate} grad_sync={sync} vs one process")
            # and the trainer's own step function, which runs the same loop
            model.zero_grad(set_to_none=True)
            loss_sum, n = sft_backward(model, micro, impl="torch", mesh=mesh)
            torch.testing.assert_close(parallel.all_reduce_sum(loss_sum, parallel.dp_group(mesh)), ref_loss,
                                       rtol=1e-5, atol=1e-5)
            assert_grads_close(grads(model), ref_grads, f"sft_backward grad_sync={sync}")
        assert_grads_close(got["last"], got["every"], "sync on last vs every micro-batch", rtol=1e-6)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ce_head(m):  # the summed token cross-entropy of a micro-batch (the loss of the head's triple)
    from nanotulu import losses
    from nanotulu.algos.sft import cross_entropy_sum

    head = losses.loss_head(m["targets"], "torch", loss_fn=cross_entropy_sum)
    return lambda hidden, weight: head(hidden, weight)[0]


@pytest.mark.parametrize("dp_replicate,world", [(1, 2), (2, 4)], ids=["fsdp2", "hsdp2x2"])
def test_grad_sync_on_last_and_hsdp_equal_one_process(dp_replicate, world):
    torch.multiprocessing.spawn(_fsdp_worker, args=(world, run.free_port(), dp_replicate), nprocs=world, join=True)


def test_hsdp_mesh_flags_are_checked():
    with pytest.raises(ValueError, match="--dp_replicate 2 x --dp_shard 3 x --tp 1 = 6, but 4 processes"):
        parallel.build_mesh(4, 3, 1, "cpu", dp_replicate=2)
    with pytest.raises(ValueError, match="--tp 1 x --dp_replicate 3 does not divide the world size 4"):
        parallel.build_mesh(4, -1, 1, "cpu", dp_replicate=3)


# ---- the DPO reference cache without a shared file system ----------------------------------------------------------


def _cache_worker(rank, world, port, dirs, hashes, bad_rank):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        calls = []

        def compute():  # collective, as compute_ref_logps is: every rank must enter it, or all would hang
            calls.append(1)
            t = torch.zeros(len(hashes), 2)
            t[rank::world] = torch.arange(2.0 * len(hashes)).view(-1, 2)[rank::world]
            dist.all_reduce(t)
            return t, None

        want = torch.arange(2.0 * len(hashes)).view(-1, 2)
        if bad_rank is not None:  # a stale file on one rank: every rank refuses, none hangs in a collective
            with pytest.raises(ValueError, match="shifted or changed"):
                load_or_compute_ref(dirs[rank], "k1", hashes, compute, rank, "cpu")
            assert not calls
            return
        # rank 0 holds the cache, rank 1 does not: both compute (rank 1 alone would hang), both now hold it
        table, path, hit = load_or_compute_ref(dirs[rank], "k1", hashes, compute, rank, "cpu")
        assert not hit and calls == [1] and torch.equal(table, want)
        assert os.path.isfile(path) and path.startswith(dirs[rank])
        table, _, hit = load_or_compute_ref(dirs[rank], "k1", hashes, compute, rank, "cpu")
        assert hit and calls == [1] and torch.equal(table, want)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bad_rank", [None, 1], ids=["one_rank_missing", "one_rank_stale"])
def test_reference_cache_on_separate_file_systems(tmp_path, bad_rank):
    hashes = torch.arange(5, dtype=torch.int64)
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    os.makedirs(dirs[0])
    # rank 0's node already has this cache (computed earlier); rank 1's node has none, or a stale one
    torch.save({"key": "k1", "pair_hashes": hashes, "logps": torch.full((5, 2), -1.0)},
               os.path.join(dirs[0], "ref_logps_k1.pt"))
    if bad_rank is not None:
        os.makedirs(dirs[1])
        torch.save({"key": "k1", "pair_hashes": hashes + 1, "logps": torch.zeros(5, 2)},
                   os.path.join(dirs[1], "ref_logps_k1.pt"))
    torch.multiprocessing.spawn(_cache_worker, args=(2, run.free_port(), dirs, hashes, bad_rank), nprocs=2,
                                join=True)
