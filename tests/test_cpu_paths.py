"""The CPU fast paths of an SFT step against their references (speed itself is measured in bench/bench_cpu_sft.py,
never here): per-document sdpa against the (B, T, T) block-diagonal mask, forward and gradients through the model;
the loss head that sends only target positions through the output weight against float64 cross-entropy over all
positions; threads and tokenize workers bounded by the machine's cores."""

import os

import torch
import torch.nn.functional as F

from nanotulu import data, losses, machine
from nanotulu.algos.sft import cross_entropy_sum
from nanotulu.model import LlamaConfig, attention_meta, build_model

TINY = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def packed_batch(lengths_per_row, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        docs = []
        for n in lengths:
            ids = torch.randint(0, 96, (n,), generator=g).tolist()
            docs.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
        rows.append(data.make_row(docs, T, pad_id=0))
    return data.stack_rows(rows, "cpu")


def test_per_document_sdpa_equals_the_block_diagonal_mask(monkeypatch):
    from nanotulu import model as model_mod

    batch = packed_batch([[40, 7, 1, 30], [96], [3, 60]], 96)
    cu = batch["cu_seqlens"]
    assert isinstance(attention_meta("sdpa", cu, 3, 96, torch.device("cpu")), list)  # the CPU default
    results = []
    for per_document in (True, False):
        monkeypatch.setattr(model_mod, "attention_meta", lambda *a, _f=model_mod.attention_meta, _p=per_document,
                            **k: _f(*a, **{**k, "per_document": _p}))
        model = build_model(TINY, seed=3, attn_backend="sdpa")
        head = losses.loss_head(batch["targets"], loss_fn=cross_entropy_sum, targets_only=True)
        loss = model(batch["input_ids"], batch["position_ids"], cu, head=head)[0]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-5)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-6, msg=n)


def test_cpu_loss_head_on_target_positions_equals_float64_cross_entropy():
    g = torch.Generator().manual_seed(0)
    N, H, V = 50, 16, 40
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.5] = -100  # prompt / padding / document ends
    for impl in ("auto", "torch"):
        hidden.grad = weight.grad = None
        loss = losses.loss_head(targets, impl, loss_fn=cross_entropy_sum, targets_only=True)(hidden[None], weight)[0]
        loss.backward()
        h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        want = F.cross_entropy(h64 @ w64.T, targets, ignore_index=-100, reduction="sum")
        want.backward()
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
        assert hidden.grad[targets == -100].abs().sum() == 0


def physical_cores_from_cpuinfo():
    """An independent count: distinct (physical id, core id) pairs of /proc/cpuinfo among the CPUs we may use."""
    allowed = os.sched_getaffinity(0)
    pairs, cpu, phys = set(), None, "0"
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value
            elif key == "core id" and cpu in allowed:
                pairs.add((phys, value))
    return len(pairs) or len(allowed)


def test_threads_default_to_the_physical_cores_per_process(monkeypatch):
    before = torch.get_num_threads()
    try:
        quota = machine.cpu_cores()
        assert quota <= physical_cores_from_cpuinfo()  # the cgroup quota may lower it, never raise it
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert machine.set_threads(0) == quota == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node 2: the cores are shared
        assert machine.set_threads(0) == max(1, quota // 2) == torch.get_num_threads()
        assert machine.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_tokenize_workers_bounded_by_the_cpus(tmp_path, monkeypatch):
    import multiprocessing

    path = tmp_path / "rows.jsonl"
    path.write_text("".join('{"x": %d}\n' % i for i in range(40)))
    monkeypatch.setattr(machine, "cpu_cores", lambda physical=True: 1)
    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: (_ for _ in ()).throw(AssertionError("a pool")))
    lines, out = data._read_and_tokenize(str(path), _double, workers=8, min_rows_per_worker=1)
    assert out == [2 * i for i in range(40)]  # in-process: 8 workers asked, one CPU


def _double(row, where):
    return 2 * row["x"]
