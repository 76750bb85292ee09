"""Every tensor the SFT, DPO, GRPO and PPO steps hand to a torch.distributed collective lives on the model's device
(NCCL reduces only CUDA tensors: a host tensor there fails on a GPU run, issue 26 B4).

On a CPU machine the model's device is the host, so comparing devices alone cannot fail. The test therefore
tracks where each tensor comes from (a TorchFunctionMode): a tensor made by a factory without a `device`, or by
`.cpu()`, is a host tensor, and so is everything computed from one, until `.to(<the model's device>)` places it.
A host tensor reaching a collective is what breaks on NCCL; here it fails the test on the CPU too. The steps run
in a one-rank gloo group, so every collective of the code is really called."""

import dataclasses
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from nanotulu import data
from nanotulu.algos.dpo import DPOParams, dpo_backward
from nanotulu.algos.grpo import GRPOParams, build_rows, group_advantages, update
from nanotulu.algos.ppo import PPOParams, ppo_rows, ppo_update
from nanotulu.algos.rollout import UpdateSchedule
from nanotulu.algos.sft import sft_backward
from nanotulu.model import Llama, LlamaConfig, build_model
from nanotulu.run import free_port

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.as_tensor,
             torch.randn, torch.rand, torch.randint, torch.linspace}
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce", "all_to_all_single")


class HostTensors(TorchFunctionMode):
    """Marks host-made tensors (see the module docstring): is_host(t)."""

    def __init__(self, device):
        super().__init__()
        self.device, self.host = torch.device(device), {}  # id -> weakref of the host-made tensors

    def is_host(self, t):
        r = self.host.get(id(t))
        return r is not None and r() is t

    def mark(self, t, host):
        if host:
            self.host[id(t)] = weakref.ref(t)
        elif self.is_host(t):
            del self.host[id(t)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        placed = None
        if func is torch.Tensor.to:  # .to(device) or .to(device=...): placed where asked
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, (str, torch.device)):
                placed = torch.device(target) == self.device
        if func is torch.Tensor.cpu or (func in FACTORIES and kwargs.get("device") is None):
            placed = False
        if placed is None:  # any other op: host-made when an input is
            placed = not any(self.is_host(t) for t in inputs)
        for t in outputs:
            self.mark(t, not placed)
        return out


@pytest.fixture
def collectives(monkeypatch):
    """A one-rank gloo group whose collectives record (name, tensor is host-made, device, shape, dtype) while the
    yielded HostTensors mode is on (the tests build models and inputs before entering it)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    mode = HostTensors("cpu")
    calls = []

    def wrap(name, real):
        def collective(t, *args, **kwargs):
            for x in (t if isinstance(t, (list, tuple)) else [t]):
                if isinstance(x, torch.Tensor):
                    calls.append((name, mode.is_host(x), x.device, tuple(x.shape), x.dtype))
            return real(t, *args, **kwargs)
        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, wrap(name, getattr(dist, name)))
    mode.calls = calls
    try:
        yield mode
    finally:
        dist.destroy_process_group()


def check(mode, model):
    calls = mode.calls
    device = next(model.parameters()).device
    assert calls, "no collective was called: nothing checked"
    bad = [c for c in calls if c[1] or c[2] != device]
    assert not bad, f"host tensors passed to collectives (name, host-made, device, shape, dtype): {bad}"


def rollouts(tok, answers):
    prompts = [tok.encode(f"<|user|>\n{p}\n<|assistant|>\n") for p, _ in answers]
    outs = [{"tokens": tok.encode(a) + [tok.eos_token_id]} for _, a in answers]
    return prompts, outs


ANSWERS = [("What is 1 + 2?", "3"), ("Hi?", "hello"), ("Count.", "1 2 3"), ("Say no.", "no")]
SCHED = UpdateSchedule(steps=1, num_epochs=1, num_mini_batches=2, lr=0.1)


def test_sft_and_dpo_steps_reduce_on_the_model_device(collectives):
    from test_dpo import make_pairs, packed_batch

    tok, pairs = make_pairs(3)
    model = build_model(TINY, seed=1)
    docs = [p["chosen"] for p in pairs]
    micro = data.micro_batches([data.make_row(docs, 256, tok.pad_token_id)], 1, "cpu")
    batch, ref = packed_batch(tok, pairs, 384), torch.randn(len(pairs), 2) - 30
    with collectives:
        sft_backward(model, micro)
        dpo_backward(model, [batch], lambda m: ref[m["pair_ids"]], DPOParams())
    check(collectives, model)


def test_grpo_step_reduces_on_the_model_device(collectives):
    tok = data.load_tokenizer("byte")
    model, ref_model = build_model(TINY, seed=1), build_model(TINY, seed=2)
    prompts, outs = rollouts(tok, ANSWERS)
    adv, _ = group_advantages(torch.tensor([10.0, 0.0, 0.0, 10.0]), 2)
    hp, opt = GRPOParams(beta=0.05, loss_impl="torch"), torch.optim.SGD(model.parameters(), lr=0.1)
    with collectives:
        rows = build_rows(model, ref_model, prompts, outs, adv, list(range(4)), hp, 128, tok.pad_token_id,
                          torch.device("cpu"), False, None)
        update(model, opt, rows, hp, SCHED, 0, None, torch.device("cpu"), False)
    check(collectives, model)


def test_ppo_step_reduces_on_the_model_device(collectives):
    """The whitening of PPO's advantages (float64, computed on the host) is all-reduced on the model's device."""
    tok = data.load_tokenizer("byte")
    policy, ref_model = build_model(TINY, seed=1), build_model(TINY, seed=2)
    value = Llama(TINY, score_head=True)
    prompts, outs = rollouts(tok, ANSWERS)
    hp = dataclasses.replace(PPOParams(), beta=0.05)
    rew = torch.tensor([10.0, 0.0, 6.0, 0.0], dtype=torch.float64)
    opt = torch.optim.SGD([{"params": policy.parameters()}, {"params": value.parameters()}], lr=0.1)
    with collectives:
        rows = ppo_rows(policy, ref_model, value, prompts, outs, rew, hp, 128, tok.pad_token_id, torch.device("cpu"),
                        False, None)
        ppo_update(policy, value, opt, rows, hp, SCHED, 0, None, torch.device("cpu"), False)
    check(collectives, policy)
    assert any(c[4] == torch.float64 for c in collectives.calls)  # the whitening sums were among them
