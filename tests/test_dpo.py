"""DPO: the loss against docs/RECIPE.md's formulas, packed pair log-probs against unpacked ones, the reference cache,
and one training step through the fused kernel against a plain-torch reference."""

import json
import math

import pytest
import torch

from nanotulu import data
from nanotulu.data import stack_pair_rows
from nanotulu.model import LlamaConfig, build_model
from nanotulu.algos.dpo import DPOParams, dpo_backward, dpo_loss, load_or_compute_ref, pair_logps, ref_cache_key
from nanotulu.pairs import load_pairs, pair_docs, pair_hashes, tokenize_pair

TINY = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def formula(loss_type, pc, pr, rc, rr, lc, lr, beta, g, s):
    """docs/RECIPE.md's table, one pair, in Python floats."""
    if loss_type == "dpo":
        z = (pc - pr) - (rc - rr)
    elif loss_type in ("dpo_norm", "ipo"):
        z = (pc / lc - pr / lr) - (rc / lc - rr / lr)
    elif loss_type == "simpo":
        z = pc / lc - pr / lr - g
    if loss_type == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    return -(1 - s) * logsig(beta * z) - s * logsig(-beta * z)


@pytest.mark.parametrize("loss_type", ["dpo", "dpo_norm", "simpo", "ipo"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_loss_matches_formulas(loss_type, smoothing):
    torch.manual_seed(0)
    P, beta, g = 6, 0.7, 0.3
    pc, pr = (-torch.rand(P, dtype=torch.float64) * 50).requires_grad_(), (-torch.rand(P, dtype=torch.float64) * 50).requires_grad_()
    rc, rr = -torch.rand(P, dtype=torch.float64) * 50, -torch.rand(P, dtype=torch.float64) * 50
    lc, lr = torch.randint(1, 30, (P,)).double(), torch.randint(1, 30, (P,)).double()
    s = 0.0 if loss_type == "ipo" else smoothing
    losses, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, lc, lr, loss_type=loss_type, beta=beta, gamma_beta_ratio=g,
                                    label_smoothing=s)
    for i in range(P):
        want = formula(loss_type, pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), lc[i].item(),
                       lr[i].item(), beta, g, s)
        assert abs(losses[i].item() - want) < 1e-9 * max(1, abs(want))
        # gradient by central differences of the formula
        for x, grad_of in ((pc, 0), (pr, 1)):
            args = [pc[i].item(), pr[i].item()]
            h = 1e-5
            args[grad_of] += h
            up = formula(loss_type, *args, rc[i].item(), rr[i].item(), lc[i].item(), lr[i].item(), beta, g, s)
            args[grad_of] -= 2 * h
            dn = formula(loss_type, *args, rc[i].item(), rr[i].item(), lc[i].item(), lr[i].item(), beta, g, s)
            g_num = (up - dn) / (2 * h)
            g_auto = torch.autograd.grad(losses[i], x, retain_graph=True)[0][i].item()
            assert abs(g_auto - g_num) < 1e-6 * max(1, abs(g_num)), (loss_type, grad_of, g_auto, g_num)
    norm = loss_type in ("dpo_norm", "ipo", "simpo")
    want_c = beta * (pc / lc if norm else pc) - (0 if loss_type == "simpo" else beta * (rc / lc if norm else rc))
    torch.testing.assert_close(rew_c, want_c.detach())


def make_pairs(n=5):
    tok = data.load_tokenizer("byte")
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"What is {i} + {2 * i}?" + " Think." * (i % 3)}]
        rows.append({"chosen": prompt + [{"role": "assistant", "content": f"It is {3 * i}."}],
                     "rejected": prompt + [{"role": "assistant", "content": f"Maybe {3 * i + 1}, or not" * (1 + i % 2)}]})
    pairs = [tokenize_pair(r, tok, "tulu", 512, True, f"mem:{i}") for i, r in enumerate(rows)]
    for i, p in enumerate(pairs):
        p.pop("truncated")
        p["id"] = i
    return tok, pairs


def reference_seq_logp(model, doc):
    """Plain full-logits log-likelihood of one sequence's answer tokens, and their count."""
    ids = torch.tensor(doc["input_ids"])[None]
    labels = torch.tensor(doc["labels"][1:])
    logp = torch.log_softmax(model.logits(ids)[0, :-1].double(), -1)  # (T-1, V)
    mask = labels != -100
    return logp[mask].gather(1, labels[mask][:, None]).sum(), int(mask.sum())


def packed_batch(tok, pairs, capacity=1024):
    row = data.make_row([d for p in pairs for d in pair_docs(p)], capacity, tok.pad_token_id)
    row["example_ids"] = [p["id"] for p in pairs]
    return stack_pair_rows([row], "cpu")


def test_prompt_masked_and_answer_trained():
    tok, pairs = make_pairs(1)
    doc = pairs[0]["chosen"]
    text = tok.decode([t for t, l in zip(doc["input_ids"], doc["labels"]) if l != -100])
    assert text == "It is 0." + tok.eos_token


def test_packed_pair_logps_equal_unpacked():
    tok, pairs = make_pairs()
    model = build_model(TINY, seed=1)
    with torch.no_grad():
        logps, counts = pair_logps(model, packed_batch(tok, pairs), impl="torch")
        for i, p in enumerate(pairs):
            for j, doc in enumerate(pair_docs(p)):
                want, n = reference_seq_logp(model, doc)
                assert counts[i, j].item() == n
                assert abs(logps[i, j].item() - want.item()) < 1e-4 * abs(want.item())


@pytest.mark.parametrize("impl,loss_type", [("triton", "dpo_norm"), ("auto", "dpo_norm"), ("fused", "dpo"),
                                            ("auto", "simpo"), ("auto", "ipo")])
def test_dpo_step_fused_kernel_equals_plain_torch(impl, loss_type):
    """One DPO step through the fused kernels == the same step from full logits. triton: the tile kernels
    (interpreted, 8NHV); auto: the chunked loss-fused path (torch rows on CPU), chunks cut on pair starts;
    fused: the same with the Triton row kernels (interpreted)."""
    tok, pairs = make_pairs(3)
    model = build_model(TINY, seed=2)
    batch = packed_batch(tok, pairs, capacity=384)
    ref = torch.randn(len(pairs), 2, dtype=torch.float32) * 5 - 60
    kw = dict(loss_type=loss_type, beta=5.0 if loss_type != "ipo" else 0.5, label_smoothing=0.1)
    if loss_type == "ipo":
        kw["label_smoothing"] = 0.0
    sums, n_pairs = dpo_backward(model, [batch], lambda m: ref[m["pair_ids"]], DPOParams(**kw), impl=impl)
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    pc, pr, lc, lr = [], [], [], []
    for p in pairs:
        (c, nc), (r, nr) = reference_seq_logp(model, p["chosen"]), reference_seq_logp(model, p["rejected"])
        pc.append(c), pr.append(r), lc.append(nc), lr.append(nr)
    losses, _, _ = dpo_loss(torch.stack(pc), torch.stack(pr), ref[:, 0].double(), ref[:, 1].double(),
                            torch.tensor(lc).double(), torch.tensor(lr).double(), **kw)
    losses.mean().backward()
    assert n_pairs.item() == len(pairs)
    assert abs(sums[0].item() / len(pairs) - losses.mean().item()) < 1e-5
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad.float(), rtol=1e-4, atol=1e-6, msg=n)


def test_reference_cache_hit_miss_and_shift(tmp_path):
    tok, pairs = make_pairs()
    hashes = pair_hashes(pairs)
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(2.0 * len(pairs)).view(-1, 2), None

    key = ref_cache_key("model-a", hashes, 2048, "dpo_norm", "tulu")
    t1, path, hit = load_or_compute_ref(str(tmp_path), key, hashes, compute, 0, "cpu")
    assert not hit and len(calls) == 1
    t2, path2, hit = load_or_compute_ref(str(tmp_path), key, hashes, compute, 0, "cpu")
    assert hit and len(calls) == 1 and path2 == path and torch.equal(t1, t2)
    # any key part changes -> a different cache entry, recomputed
    for other in (ref_cache_key("model-b", hashes, 2048, "dpo_norm", "tulu"),
                  ref_cache_key("model-a", hashes, 1024, "dpo_norm", "tulu"),
                  ref_cache_key("model-a", hashes, 2048, "dpo", "tulu"),
                  ref_cache_key("model-a", hashes, 2048, "dpo_norm", "{{ messages }}"),
                  ref_cache_key("model-a", pair_hashes(pairs[1:] + pairs[:1]), 2048, "dpo_norm", "tulu")):
        assert other != key
        load_or_compute_ref(str(tmp_path), other, hashes, compute, 0, "cpu")
    assert len(calls) == 6
    # a cache file whose pairs no longer line up is refused, not silently used
    shifted = torch.roll(hashes, 1)
    with pytest.raises(ValueError, match="shifted"):
        load_or_compute_ref(str(tmp_path), key, shifted, compute, 0, "cpu")


def test_bad_pairs(tmp_path):
    tok = data.load_tokenizer("byte")
    p = [{"role": "user", "content": "Hi"}]
    rows = [
        {"chosen": p + [{"role": "assistant", "content": "Hello"}],
         "rejected": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Go away"}]},
    ]
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*different prompts"):
        load_pairs([(str(f), None)], tok, "tulu", 512, True, 0)
    f.write_text(json.dumps({"chosen": p + [{"role": "assistant", "content": ""}],
                             "rejected": p + [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'chosen': empty answer"):
        load_pairs([(str(f), None)], tok, "tulu", 512, True, 0)
    long = {"chosen": p + [{"role": "assistant", "content": "a" * 100}],
            "rejected": p + [{"role": "assistant", "content": "b" * 10}]}
    ok = {"chosen": p + [{"role": "assistant", "content": "a"}], "rejected": p + [{"role": "assistant", "content": "b"}]}
    f.write_text(json.dumps(long) + "\n" + json.dumps(ok) + "\n")
    pairs, stats = load_pairs([(str(f), None)], tok, "tulu", 40, True, 0)
    assert stats["truncated"] == 1 and len(pairs) == 2 and len(pairs[0]["chosen"]["input_ids"]) == 40
    pairs, stats = load_pairs([(str(f), None)], tok, "tulu", 40, False, 0)
    assert stats["dropped_too_long"] == 1 and len(pairs) == 1
