"""Dispatch from a row's `dataset` to its verifiers, and the RL reward of a score.

Several verifiers per row: `dataset` may be a list; the score is the mean of the verifiers' scores. `ground_truth`
is then either one value shared by all verifiers, or a list with one ground truth per verifier (same length).
"""

from nanotulu.rewards.gsm8k import verify_gsm8k
from nanotulu.rewards.ifeval import verify_ifeval
from nanotulu.rewards.math import verify_math
from nanotulu.rewards.string_match import verify_string_match

VERIFIERS = {
    "gsm8k": verify_gsm8k,
    "math": verify_math,
    "ifeval": verify_ifeval,
    "string_match": verify_string_match,
}


def verifier_pairs(dataset, ground_truth):
    """(verifier name, ground truth) pairs of a row; see the module docstring for lists."""
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    if not names:
        raise ValueError("dataset is an empty list")
    names = [n.lower() if isinstance(n, str) else n for n in names]
    for n in names:
        if n not in VERIFIERS:
            raise ValueError(f"unknown verifier {n!r}; known: {sorted(VERIFIERS)}")
    if len(names) > 1 and isinstance(ground_truth, list) and len(ground_truth) == len(names):
        return list(zip(names, ground_truth))
    return [(n, ground_truth) for n in names]


def verify(dataset, response, ground_truth, *, ifeval_all_or_nothing=False):
    """Score in [0, 1] of one response. `dataset` names the verifier, or is a list of names: then the score is the
    mean of their scores (ground_truth shared, or a list with one per verifier). Raises ValueError for an unknown
    verifier or a malformed ground truth."""
    scores = []
    for name, gt in verifier_pairs(dataset, ground_truth):
        if name == "ifeval":
            scores.append(verify_ifeval(response, gt, all_or_nothing=ifeval_all_or_nothing))
        else:
            scores.append(VERIFIERS[name](response, gt))
    return sum(scores) / len(scores)


def score_to_reward(score, finished, *, scale=10.0, nonstop_penalty=None):
    """RL reward of a verifier score: score * scale, or nonstop_penalty (the reward itself, e.g. -10.0 or 0.0) for
    an answer cut off by the length limit (finished=False) when a penalty is set."""
    if not finished and nonstop_penalty is not None:
        return float(nonstop_penalty)
    return float(score) * scale


def reward(dataset, response, ground_truth, finished, *, scale=10.0, nonstop_penalty=None, **verify_kwargs):
    """score_to_reward(verify(...)); a cut-off answer with a penalty set is not verified at all."""
    if not finished and nonstop_penalty is not None:
        return float(nonstop_penalty)
    return score_to_reward(verify(dataset, response, ground_truth, **verify_kwargs), finished, scale=scale)
