"""Verifiable rewards for RLVR: verifiers, batch verification in worker processes, and the RLVR row loader.

A verifier maps (response, ground_truth) -> score in [0, 1]. The RL reward is the score times `scale` (Tulu 3: 10),
or `nonstop_penalty` for an answer cut off by the length limit when a penalty is set.

One module per concern:
- gsm8k.py: the last number of the response equals the numeric ground truth.
- math.py: the boxed / "Final Answer" / last `$...$` answer is equivalent to the LaTeX ground truth (math-verify).
- ifeval.py: Google IFEval's 25 instruction types and Tulu 3's checking functions, with their argument checks.
- language.py: language detection for IFEval's language and English-case instructions.
- string_match.py: normalized answer text equals the ground truth.
- dispatch.py: `verify` (a row's verifiers by the names in its `dataset` column, compared lower-case; a list of
  names scores the mean), `reward` and `score_to_reward`.
- pool.py: `verify_batch`, many answers in worker processes with a timeout per answer.
- rlvr_rows.py: `load_rlvr_rows`, RLVR rows read and validated at load time.
"""

from nanotulu.rewards.dispatch import VERIFIERS, reward, score_to_reward, verifier_pairs, verify
from nanotulu.rewards.gsm8k import extract_last_number, verify_gsm8k
from nanotulu.rewards.ifeval import (
    IFEVAL_INSTRUCTIONS,
    TULU_IF_FUNCTIONS,
    count_words,
    parse_ifeval_ground_truth,
    split_sentences,
    verify_ifeval,
)
from nanotulu.rewards.language import IFEVAL_LANGUAGES, detect_language
from nanotulu.rewards.math import extract_math_answer, verify_math
from nanotulu.rewards.pool import DEFAULT_MAX_CHARS, shutdown_pool, verify_batch
from nanotulu.rewards.rlvr_rows import load_rlvr_rows
from nanotulu.rewards.string_match import normalize_answer, verify_string_match

__all__ = [
    "DEFAULT_MAX_CHARS", "IFEVAL_INSTRUCTIONS", "IFEVAL_LANGUAGES", "TULU_IF_FUNCTIONS", "VERIFIERS",
    "count_words", "detect_language", "extract_last_number", "extract_math_answer", "load_rlvr_rows",
    "normalize_answer", "parse_ifeval_ground_truth", "reward", "score_to_reward", "shutdown_pool", "split_sentences",
    "verifier_pairs", "verify", "verify_batch", "verify_gsm8k", "verify_ifeval", "verify_math", "verify_string_match",
]
