"""Resumable checkpoints and the final Hugging Face export.

- save_checkpoint / resume / load_checkpoint: torch.distributed.checkpoint (DCP) for model + optimizer (sharded
  under FSDP, plain otherwise), plus one small file per rank for what is not a tensor of the model (step, data
  loader position, RNG states). Written to a temporary name, renamed when every rank is done.
- full_state_dict / save_hf: the whole model gathered from its shards, written as an HF checkpoint by rank 0.
"""

import json
import os
import random
import shutil
import warnings

import torch
import torch.distributed as dist


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(ckpt_dir, step, model, optimizer, extra, rank, keep=2):
    """Writes ckpt_dir/step_{step:08d}: first into a temporary directory, renamed when every rank is done, so a
    crash mid-write never leaves a checkpoint that looks whole. `extra` (per rank): loader state, RNG, etc."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    msd, osd = get_state_dict(model, optimizer, options=state_dict_options(model))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    torch.save({**extra, "rng": rng_state(), "step": step, "layout": checkpoint_layout(model)},
               os.path.join(tmp, f"extra_rank{rank}.pt"))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    barrier()
    return final


def save_if_due(cfg, ckpt_dir, step, total_steps, model, optimizer, data_state, rank):
    """Every --save_every steps (not after the last: the final export follows), a checkpoint with the data loader's
    or prompt sampler's position."""
    if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
        save_checkpoint(ckpt_dir, step, model, optimizer, {"data": data_state.state_dict()}, rank)


def resume(cfg, model, optimizer, data_state, rank, world):
    """With --resume, continues from the latest checkpoint in output_dir/checkpoints: model, optimizer, RNG and
    `data_state` (the data loader or prompt sampler: anything with state_dict/load_state_dict).
    Returns (checkpoint directory, the step to continue from)."""
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    latest = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if latest is None:
        return ckpt_dir, 0
    extra = load_checkpoint(latest, model, optimizer, rank, world)
    data_state.load_state_dict(extra["data"])
    if rank == 0:
        print(f"resumed from {latest} at step {extra['step']}")
    return ckpt_dir, extra["step"]


def latest_checkpoint(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return None
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))
    return os.path.join(ckpt_dir, done[-1]) if done else None


def load_checkpoint(path, model, optimizer, rank, world_size):
    """Restores model, optimizer and RNG in place; returns this rank's `extra` dict (with "step")."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    extra_path = os.path.join(path, f"extra_rank{rank}.pt")
    n_saved = len([f for f in os.listdir(path) if f.startswith("extra_rank")])
    if n_saved != world_size or not os.path.isfile(extra_path):
        raise ValueError(f"{path}: written by {n_saved} ranks, this run has {world_size}: resume on the same mesh")
    extra = torch.load(extra_path, weights_only=False)
    saved, now = extra.get("layout"), checkpoint_layout(model)
    if saved is not None and None not in (saved["model"], now["model"]) and saved["model"] != now["model"]:
        diff = ", ".join(f"{k} {v} (this run: {now['model'].get(k)})" for k, v in saved["model"].items()
                         if now["model"].get(k) != v)
        raise ValueError(f"{path}: written by a model of another shape: {diff}")
    if saved is not None and saved["mesh"] != now["mesh"]:
        raise ValueError(f"{path}: written on mesh {saved['mesh']}, this run's is {now['mesh']}: resume with the "
                         "same --dp_shard and --tp")
    options = state_dict_options(model)
    msd, osd = get_state_dict(model, optimizer, options=options)
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        try:
            dcp.load(sd, checkpoint_id=path)
        except (Exception, dcp.api.CheckpointException) as e:  # shapes or names differ (CheckpointException is a
            # BaseException whose last line names the tensor)
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [repr(e)]
            raise ValueError(f"{path}: does not match this model/optimizer ({last[0][:300]})") from e
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=options)
    set_rng_state(extra["rng"])
    return extra


def checkpoint_layout(model):
    """What a resume must match besides the rank count: the model's shape and the mesh its parameters live on
    ({"dp": 2, "tp": 2}; None when not parallelised)."""
    from torch.distributed.tensor import DTensor

    p = next(model.parameters())
    mesh = dict(zip(p.device_mesh.mesh_dim_names, p.device_mesh.shape)) if isinstance(p, DTensor) else None
    return {"model": model_shape(model), "mesh": mesh}


def model_shape(model):
    """The config fields that decide every tensor's shape (None for a model without a LlamaConfig)."""
    c = getattr(model, "cfg", None)
    return None if c is None else {k: getattr(c, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "tie_word_embeddings")}


def barrier():
    if dist.is_initialized():
        dist.barrier()


def state_dict_options(model):
    """Frozen parameters (a LoRA run's base weights, nanotulu/lora.py) stay out of a checkpoint: they are the
    --model's, reloaded at the start; the checkpoint holds the trainable parameters and their optimizer state.
    strict=False then lets the frozen ones be absent on load (every trainable one is still read: dcp.load fills
    the whole trainable state dict or fails)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=not frozen)


def full_state_dict(model):
    """The whole model's state dict as plain CPU tensors (gathers FSDP/TP shards). Under a process group only rank 0
    gets it (the others an empty dict), so a large model is not held in CPU memory once per rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def trainable_state_dict(model):
    """{name: full CPU tensor} of the trainable parameters only (a LoRA run's adapters: the frozen base never
    travels), gathered from FSDP / TP shards. Under a process group every rank must call it; all get the tensors."""
    if not dist.is_initialized():
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=True))
    box = [sd if dist.get_rank() == 0 else {}]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered_tensor(t):
    """t as one plain tensor: a DTensor (FSDP / TP shard) gathered, which every rank must call in the same order."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def save_hf(model, out_dir, tok=None, template="tulu", rank=0, state_dict=None):
    """Final Hugging Face checkpoint (gathered from shards). With a tokenizer (data.HFTokenizer, or the embedded
    ByteTokenizer written as an equivalent tokenizer.json), also its files as training used them: tokenizer.json,
    tokenizer_config.json holding `template` (the chat
    template trained with, as Jinja) and the eos/bos/pad tokens; config.json and generation_config.json name the
    same token ids, so transformers' generate stops where nanotulu's does. state_dict: full tensors to write instead
    of the model's own (a LoRA run's merged weights, rank 0; lora.save_merged)."""
    sd = full_state_dict(model) if state_dict is None else state_dict
    if rank == 0:
        model.save_pretrained(out_dir, state_dict=sd)
        if tok is not None and hasattr(tok, "save"):
            tok.save(out_dir, template)
            ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
            if tok.pad_token is not None:  # a declared pad only (the EOS filling packed rows is no pad token)
                ids["pad_token_id"] = tok.pad_token_id
            config_path = os.path.join(out_dir, "config.json")
            with open(config_path) as f:
                config = json.load(f)
            with open(config_path, "w") as f:
                json.dump({**config, **ids}, f, indent=2)
            with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
                json.dump(ids, f, indent=2)
    barrier()
