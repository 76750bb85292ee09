"""Batched generation with the nanotulu model itself: static KV cache, prefill then decode, one compiled step.

The policy being trained generates its own rollouts (RLVR) and eval answers, so there is no second copy of the
weights and nothing to sync. The design follows gpt-fast's generate.py:

- prompts of different lengths are LEFT-padded to P tokens, so every row's last prompt token sits in column P-1 and
  every decode step writes one cache slot (P, P+1, ...) shared by all rows. Row b's pad slots (j < pad_b) are
  masked out of attention, and its position ids start at 0 at its first real token;
- prefill runs each distinct prompt once (the (G, P) batch of prompts) and fills the cache; with num_samples=n
  (RLVR's groups) the prompt's cache slots are copied to its n decode rows instead of prefilling it n times; only
  the last position goes through the output projection (a (G, V) logits matrix, never (G, P, V));
- decode runs one token per row per step, with static shapes: the step reads and writes only tensors allocated
  before the loop (the "state" dict below), so on GPU it is compiled once and captured in a CUDA graph, and the
  host loop just refills the sampling noise and replays the graph. Rows that finished keep decoding (their tokens
  are discarded): the host checks "all done" only every `check_every` steps, never syncing per step.

Sampling: logits / temperature, then top-k, then top-p (nucleus) filtering, then a draw by the exponential race:
argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with probability p_i (like gpt-fast, no host sync). The noise
comes from a seeded torch.Generator, so a seed reproduces the samples exactly, eager or compiled.

Log-probs: for each returned token, log_softmax(logits / temperature) at that token, BEFORE top-k/top-p
filtering. This is the raw policy at the sampling temperature, what RLVR compares against the trainer's own
recomputed log-probs (open-instruct divides logits by the same temperature). Greedy decoding (greedy=True) uses
the given temperature for the log-probs too; temperature=0 means greedy with log-probs at temperature 1.

FSDP2 / tensor parallel: generate runs inside parallel.gathered(model): the sharded weights are gathered ONCE (an
all-gather; all ranks must call generate together) into a plain Llama, generation runs on it with no FSDP hooks and
no collective per step (so ranks may stop at different steps), and the model is resharded afterwards.
"""

import torch
import torch.nn.functional as F

from nanotulu.model import Llama, eval_mode
from nanotulu.parallel import gathered


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample(logits, noise=None, *, temperature=1.0, top_k=0, top_p=1.0, greedy=False):
    """logits (B, V) fp32 -> token (B,) long, logprob (B,) fp32 = log_softmax(logits / temperature)[token].
    noise (B, V): i.i.d. Exp(1) draws (unused when greedy)."""
    tempered = logits / temperature  # (B, V): the policy the returned log-probs are taken under (unfiltered)
    if greedy:
        token = tempered.argmax(dim=-1)
    else:
        filtered = tempered
        if top_k > 0:  # keep the k largest (ties with the k-th kept too)
            kth = torch.topk(filtered, min(top_k, filtered.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if top_p < 1.0:  # keep the smallest prefix (by probability) whose mass reaches top_p
            sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)  # (B, V)
            probs = torch.softmax(sorted_logits, dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
            drop = mass_before >= top_p
            drop[:, 0] = False  # the most likely token always stays
            filtered = filtered.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(filtered, dim=-1)
        # exponential race: P(argmax p_i / E_i = i) = p_i; a noise of exactly 0 would pick a p=0 token
        token = (probs / noise.clamp_min(1e-30)).argmax(dim=-1)
    # log-softmax at one token per row: no (B, V) log-prob matrix
    logprob = tempered.gather(1, token[:, None])[:, 0] - torch.logsumexp(tempered, dim=-1)
    return token, logprob


# ----------------------------------------------------------------------------------------------------------------
# One decode step on static tensors


def take_token(state, logits, sampling):
    """Samples from logits (B, V), records the token and its log-prob in column state["t"], updates done/counts."""
    token, logprob = sample(logits, state["noise"], **sampling)
    done = state["done"]  # (B,) True for rows that finished before this token
    token = token.masked_fill(done, 0)  # finished rows feed token 0 (any valid id) and their output is discarded
    state["out_tokens"].index_copy_(1, state["t"], token[:, None])
    state["out_logprobs"].index_copy_(1, state["t"], logprob.masked_fill(done, 0.0)[:, None])
    state["n_new"].add_((~done).long())
    done.logical_or_((token[:, None] == state["eos"]).any(dim=-1))
    state["token"].copy_(token)
    state["t"].add_(1)


def decode_step(model, state, sampling):
    """Feeds state["token"] (the last sampled token of every row) at cache slot state["slot"] and samples the next.
    Every tensor read or written lives in `state` (static shapes), so this function can be CUDA-graph captured."""
    slot = state["slot"]  # (1,) long
    # mask (B, 1, 1, S): the row's real slots up to and including this one
    mask = (state["valid"] & (state["slot_ids"] <= slot))[:, None, None, :]
    cache = {"k": state["k"], "v": state["v"], "pos": slot, "mask": mask}
    h = model(state["token"][:, None], state["position"][:, None], cache=cache)  # (B, 1, H)
    logits = F.linear(h[:, -1], model.output_weight).float()  # (B, V)
    take_token(state, logits, sampling)
    slot.add_(1)
    state["position"].add_(1)


# ----------------------------------------------------------------------------------------------------------------
# The generation loop


def check_generate_args(model, prompts, max_new_tokens, eos_token_id, temperature, top_k, top_p, stop_strings, decode,
                max_len):
    cfg = model.cfg
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if eos_token_id is None or (isinstance(eos_token_id, (list, tuple)) and len(eos_token_id) == 0):
        raise ValueError("eos_token_id is missing (a tokenizer without an EOS token?): generation needs one to stop")
    context = cfg.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                             f"model context of {context} (max_position_embeddings)")
        bad = [t for t in p if not (0 <= t < cfg.vocab_size)]
        if bad:
            raise ValueError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
    need = max(len(p) for p in prompts) + max_new_tokens
    if max_len is not None and max_len < need:
        raise ValueError(f"max_len={max_len} is shorter than the longest prompt + max_new_tokens = {need}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0 or not (0.0 < top_p <= 1.0):
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a `decode` callable (token ids -> text)")


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens, eos_token_id, temperature=1.0, top_p=1.0, top_k=0, greedy=False,
             seed=None, stop_strings=None, decode=None, max_len=None, compile=False, check_every=8,
             prefill_rows=None, num_samples=1):
    """Generates `num_samples` continuations of every prompt (a list of token ids) in one batch.

    eos_token_id: an id or a list of ids; a row stops after emitting one (an id outside the vocabulary never
    matches, e.g. -1 to always run max_new_tokens). stop_strings: a row also stops once decode(new tokens) contains
    one of them (checked on the host every `check_every` steps; the tokens are cut right after the one completing
    the string). seed: an int or a torch.Generator on the model's device. max_len: cache slots (default: longest
    prompt + max_new_tokens). compile: torch.compile the decode step, and on CUDA capture it in a CUDA graph; the
    step's shapes are (prompts, max_len), not the prompt length, so a fixed max_len (e.g. max prompt length +
    max_new_tokens) and batch size let every call reuse one compilation (a new CUDA graph is captured per call).
    prefill_rows: prompts per prefill chunk (default: as many as keep the attention scores near 1 GiB).
    num_samples: answers per prompt (a GRPO group). Each prompt is prefilled once and its KV cache rows copied to
    its n samples; the result equals generating the list with every prompt repeated n times (same seed, same
    samples), without n prefills.

    Returns one dict per prompt and sample (prompt 0's num_samples answers first, then prompt 1's, ...): "tokens"
    (new token ids, the EOS included when it stopped on one), "logprobs" (log_softmax(logits / temperature) of each
    token, see the module docstring), "finish_reason" ("stop": EOS or a stop string, "length": max_new_tokens
    reached)."""
    check_generate_args(model, prompts, max_new_tokens, eos_token_id, temperature, top_k, top_p, stop_strings, decode,
                max_len)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if temperature == 0:
        greedy, temperature = True, 1.0
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), greedy=bool(greedy))
    with eval_mode(model), gathered(model) as m:  # sampling is inference: no dropout
        return _generate(m, prompts, max_new_tokens, eos_token_id, sampling, seed, stop_strings, decode, max_len,
                         compile, check_every, prefill_rows, num_samples)


def _generate(model, prompts, max_new_tokens, eos_token_id, sampling, seed, stop_strings, decode, max_len, compile,
              check_every, prefill_rows, n):
    cfg = model.cfg
    weight = model.output_weight
    device, dtype = weight.device, weight.dtype
    G, P, N = len(prompts), max(len(p) for p in prompts), max_new_tokens
    B = G * n  # decode rows: prompt g's samples are rows g*n .. g*n + n-1
    S = max_len or P + N
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)  # (G,)
    lengths = prompt_lengths.repeat_interleave(n)  # (B,)
    pad = P - lengths  # (B,) left padding of each row
    input_ids = torch.zeros(G, P, dtype=torch.long)
    for g, p in enumerate(prompts):
        input_ids[g, P - len(p):] = torch.tensor(p, dtype=torch.long)
    input_ids = input_ids.to(device)
    columns = torch.arange(P, device=device)
    position_ids = (columns[None, :] - (P - prompt_lengths)[:, None]).clamp_min(0)  # (G, P): 0 at the first token

    if isinstance(seed, torch.Generator):
        gen = seed
    else:
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()  # a non-deterministic seed, leaving the global RNG alone
        else:
            gen.manual_seed(seed)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)

    slot_ids = torch.arange(S, device=device)
    kv_shape = (B, cfg.num_key_value_heads, S, cfg.head_dim)
    state = dict(
        k=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
        v=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
        valid=slot_ids[None, :] >= pad[:, None],  # (B, S): False on the row's left padding
        slot_ids=slot_ids,  # (S,)
        slot=torch.full((1,), P, device=device),  # cache slot of the token fed to the next decode step
        position=lengths.clone(),  # (B,) its position id
        token=torch.zeros(B, dtype=torch.long, device=device),  # (B,) the token fed to the next decode step
        t=torch.zeros(1, dtype=torch.long, device=device),  # output column written next
        done=torch.zeros(B, dtype=torch.bool, device=device),
        n_new=torch.zeros(B, dtype=torch.long, device=device),  # tokens produced before finishing, EOS included
        out_tokens=torch.zeros(B, N, dtype=torch.long, device=device),
        out_logprobs=torch.zeros(B, N, dtype=torch.float32, device=device),
        noise=None if sampling["greedy"] else torch.empty(B, cfg.vocab_size, device=device),
        eos=eos,
    )

    # Prefill: each distinct prompt once, into a (rows, kv heads, P, head_dim) cache of its own, whose slots 0..P-1
    # are then copied to the prompt's n sample rows of the decode cache. A query attends to the row's real slots up
    # to itself; a pad query attends to itself only (a fully masked row would give NaN, which would spread into the
    # pad slots' keys and values of later layers). Prompts go in chunks: a masked attention may run on the math
    # kernel, whose (rows, heads, P, P) fp32 scores are held to about 1 GiB.
    valid = columns[None, :] >= (P - prompt_lengths)[:, None]  # (G, P)
    causal = columns[None, :] <= columns[:, None]  # (P, P)
    prefill_mask = (valid[:, None, :] & causal[None]) | torch.eye(P, dtype=torch.bool, device=device)[None]
    rows = prefill_rows or max(1, 2**30 // (4 * cfg.num_attention_heads * P * P))
    last_hidden = torch.empty(G, cfg.hidden_size, device=device, dtype=dtype)
    for g0 in range(0, G, rows):
        g1 = min(G, g0 + rows)
        kv = (g1 - g0, cfg.num_key_value_heads, P, cfg.head_dim)
        cache = {"k": [torch.empty(kv, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
                 "v": [torch.empty(kv, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
                 "pos": columns, "mask": prefill_mask[g0:g1, None]}
        h = model(input_ids[g0:g1], position_ids[g0:g1], cache=cache)  # (rows, P, H)
        last_hidden[g0:g1] = h[:, -1]  # the last column is every row's last prompt token
        for full, part in zip(state["k"] + state["v"], cache["k"] + cache["v"]):
            full[g0 * n:g1 * n, :, :P] = part.repeat_interleave(n, dim=0)  # shared by the prompt's n samples
    logits = F.linear(last_hidden, weight).float().repeat_interleave(n, dim=0)  # (B, V)
    del h, cache, prefill_mask
    if state["noise"] is not None:
        state["noise"].exponential_(generator=gen)
    take_token(state, logits, sampling)

    step = _make_step(model, state, sampling, compile)
    stop_at = {}  # row -> number of tokens kept, for rows cut by a stop string
    checked = [0] * B  # row -> number of its tokens known to contain no stop string
    for i in range(1, N):
        if state["noise"] is not None:
            state["noise"].exponential_(generator=gen)
        step()
        if (i + 1) % check_every == 0 or i == N - 1:
            if stop_strings:
                _find_stop_strings(state, stop_strings, decode, stop_at, checked)
            if bool(state["done"].all()):
                break
    if stop_strings:
        _find_stop_strings(state, stop_strings, decode, stop_at, checked)

    out_tokens, out_logprobs = state["out_tokens"].tolist(), state["out_logprobs"].tolist()
    n_new, eos_set = state["n_new"].tolist(), set(eos.tolist())
    results = []
    for b in range(B):
        n = stop_at.get(b, n_new[b])
        tokens = out_tokens[b][:n]
        stopped = b in stop_at or tokens[-1] in eos_set
        results.append(dict(tokens=tokens, logprobs=out_logprobs[b][:n], finish_reason="stop" if stopped else "length"))
    return results


def _find_stop_strings(state, stop_strings, decode, stop_at, checked):
    """Host side: cuts rows whose new text contains a stop string right after the token that completes it, and
    marks them done on the device so they stop counting."""
    out_tokens, n_new = state["out_tokens"].tolist(), state["n_new"].tolist()
    for b, n in enumerate(n_new):
        if b in stop_at or checked[b] >= n:
            continue
        tokens = out_tokens[b][:n]
        if any(s in decode(tokens) for s in stop_strings):
            # the first token whose prefix text holds a stop string (the string may span several tokens)
            cut = next(i for i in range(checked[b] + 1, n + 1) if any(s in decode(tokens[:i]) for s in stop_strings))
            stop_at[b] = cut
            state["done"][b] = True
        checked[b] = n


def _make_step(model, state, sampling, compile):
    """Returns a no-argument callable running one decode step in place on `state`: eager; compiled; or, on CUDA,
    compiled and replayed from a CUDA graph."""
    if not compile:
        return lambda: decode_step(model, state, sampling)
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=False)
    if state["token"].device.type != "cuda":
        return lambda: compiled(model, state, sampling)

    # CUDA graph: the capture records kernels without running them, so warm-up (compilation, autotuning) happens
    # on real steps first; it runs the first two decode steps eagerly-compiled, the graph replays all later ones.
    calls = {"n": 0}
    graph = torch.cuda.CUDAGraph()

    def step():
        if calls["n"] < 2:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                compiled(model, state, sampling)
            torch.cuda.current_stream().wait_stream(stream)
            if calls["n"] == 1:
                with torch.cuda.graph(graph):
                    compiled(model, state, sampling)
        else:
            graph.replay()
        calls["n"] += 1

    return step


# ----------------------------------------------------------------------------------------------------------------
# Command line: one chat turn from a checkpoint


def main(argv=None):
    """python -m nanotulu.generate --model DIR --prompt "What is 2+2?" [--system TEXT] [--template tulu|hf|FILE]
    Renders the prompt with the checkpoint's own chat template unless --template says otherwise (as eval and the
    trainers read it), generates, prints the answer; returns {"prompt_ids", "tokens", "text"}."""
    import argparse

    from nanotulu.data import TEMPLATE_HELP, load_tokenizer, render_chat, resolve_template

    parser = argparse.ArgumentParser(prog="python -m nanotulu.generate", description=main.__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or 'byte' (default: --model)")
    parser.add_argument("--template", default=None, help=TEMPLATE_HELP + " (default: the checkpoint's own)")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--system", default=None, help="an optional system message")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    tok = load_tokenizer(args.tokenizer or args.model)
    try:
        template = resolve_template(args.template, tok)  # before the model is loaded
    except ValueError as e:
        raise SystemExit(str(e)) from None
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    prompt = tok.encode(render_chat(messages, template, tok.eos_token, True, tok.bos_token))
    model = Llama.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()
    out = generate(model, [prompt], max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                   greedy=args.temperature == 0, temperature=args.temperature or 1.0, top_p=args.top_p,
                   seed=args.seed)[0]
    text = tok.decode(out["tokens"], skip_special_tokens=True)
    print(text)
    return {"prompt_ids": prompt, "tokens": out["tokens"], "text": text}


if __name__ == "__main__":
    main()
