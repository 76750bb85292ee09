"""bench/bench_cpu_sft.py on a tiny shape: the script runs end to end and prints the paired figure, and its two
sides do the same work: from the same weights, one optimizer step on the same documents moves every weight the
same way (nanotulu's packed rows and fused loss vs transformers' padded batches and labels= loss; AdamW's first
step is lr x sign-like, so another document, mask or position would show as updates of lr apart)."""

import importlib.util
import os

import torch

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_cpu_sft.py")


def load():
    spec = importlib.util.spec_from_file_location("bench_cpu_sft", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_sides_train_the_same_step():
    b = load()
    cfg = b.smollm_135m(layers=1, vocab=128)
    docs = b.make_docs(6, 20, 64, 128, prompt_frac=0.3)
    model, nt_step, _ = b.nanotulu_side(cfg, docs, 64, lr=1e-3)
    hf_model, hf_step = b.transformers_side(cfg, {k: v.detach().clone() for k, v in model.state_dict().items()},
                                            docs, batch=4, lr=1e-3)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    nt_step()
    hf_step()
    hf_state = hf_model.state_dict()
    lr = 1e-3
    for name, before in start.items():
        ours, theirs = model.state_dict()[name] - before, hf_state[name] - before
        assert ours.abs().max() > 0.5 * lr, name  # the step moved it
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0.1 * lr, msg=name)


def test_prints_the_paired_figure(capsys):
    result = load().main(["--layers", "1", "--vocab", "128", "--docs", "4", "--doc_len", "20", "--row_len", "64",
                          "--steps", "1", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert result["nanotulu"] > 0 and result["transformers"] > 0
    assert "real tok/s" in out and "nanotulu / transformers:" in out
