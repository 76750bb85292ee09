"""--help of every trainer: four groups in a fixed order, every flag described with its default (the variant's own
for RLVR's --algo ppo, read against PPO_RECIPE), booleans as true|false, test hooks hidden; eval and decontam list
required flags without a "(default: None)"."""

import contextlib
import dataclasses
import io
import re

import pytest

from nanotulu import decontam, eval as nt_eval, train_dpo, train_rlvr, train_rm, train_sft
from nanotulu.flags import GROUPS, resolve_flags

TRAINERS = [(train_sft, train_sft.SFTConfig), (train_dpo, train_dpo.DPOConfig), (train_rm, train_rm.RMConfig),
            (train_rlvr, train_rlvr.RLVRConfig)]
HIDDEN = {"exit_after_steps"}


def help_text(main, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return out.getvalue()


def flag_entries(text):
    """{flag: (group, description with its default)} as --help prints them (argparse wraps lines)."""
    entries, group, current = {}, None, None
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            group, current = line[:-1], None
            continue
        m = re.match(r"  --(\w+)(?: (\S+))?(.*)", line)
        if m:
            current = m.group(1)
            entries[current] = [group, m.group(2), m.group(3).strip()]
        elif current and line.startswith("   "):
            entries[current][2] += " " + line.strip()
    return entries


@pytest.mark.parametrize("module,cls", TRAINERS, ids=lambda x: getattr(x, "__name__", ""))
def test_trainer_help_groups_every_flag_with_a_description_and_its_default(module, cls):
    text = help_text(module.main, [])
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and line[:-1] in GROUPS]
    assert headings == list(GROUPS)  # model and data, training, parallelism and speed, logging and output
    entries = flag_entries(text)
    for f in dataclasses.fields(cls):
        if f.name in HIDDEN:
            assert f.name not in entries, f"--{f.name} is a test hook and must not be listed"
            continue
        group, metavar, desc = entries[f.name]
        assert group in GROUPS, (f.name, group)
        assert desc and not desc.startswith("(default"), f"--{f.name} has no description"
        assert desc.endswith(f"(default: {f.default!r})"), (f.name, desc)
        if f.type in (bool, "bool"):
            assert metavar == "true|false", (f.name, metavar)
    assert "debug" in entries and entries["debug"][0] == "logging and output"
    assert entries["model"][0] == "model and data" and entries["tp"][0] == "parallelism and speed"
    assert entries["output_dir"][0] == "logging and output" and entries["lr"][0] == "training"


def test_rlvr_help_shows_the_ppo_recipe_for_algo_ppo():
    grpo = flag_entries(help_text(train_rlvr.main, []))
    ppo = flag_entries(help_text(train_rlvr.main, ["--algo", "ppo"]))
    fields = {f.name: f for f in dataclasses.fields(train_rlvr.RLVRConfig)}
    changed = 0
    for name, value in train_rlvr.PPO_RECIPE.items():
        assert ppo[name][2].endswith(f"(default: {value!r})"), (name, ppo[name])
        assert grpo[name][2].endswith(f"(default: {fields[name].default!r})"), (name, grpo[name])
        changed += value != fields[name].default
    assert changed >= 3  # the recipes differ, so the test can tell which one was shown


def test_algo_ppo_defaults_still_yield_to_given_flags():
    cfg = resolve_flags(train_rlvr.RLVRConfig, {}, ["--algo", "ppo", "--lr", "1e-4", "--model", "m"],
                        variant=train_rlvr.variant_defaults)
    assert cfg.lr == 1e-4  # given
    other = next(k for k, v in train_rlvr.PPO_RECIPE.items() if k != "lr")
    assert getattr(cfg, other) == train_rlvr.PPO_RECIPE[other]  # the recipe's default


@pytest.mark.parametrize("main", [nt_eval.main, decontam.main], ids=["eval", "decontam"])
def test_required_flags_show_no_default(main):
    text = help_text(main, [])
    assert "(default: None)" not in text
    entries = flag_entries(text)
    assert all(desc for _, _, desc in entries.values()), [k for k, v in entries.items() if not v[2]]
