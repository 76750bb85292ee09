"""The training algorithms, one module each, below the train scripts: sft, dpo, rm, rollout (what GRPO and PPO share:
sampling, scoring, packed rollout rows, the update schedule), grpo, ppo. Each takes its hyperparameters as a small
dataclass of its own (flags.pick builds it from a script's flags), never the command-line config."""
