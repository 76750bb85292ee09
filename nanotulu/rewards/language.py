"""Language detection for IFEval's language:response_language, Tulu's validate_response_language and the English
checks of change_case:english_capital / english_lowercase.

IFEval (and open-instruct) call `langdetect.detect(text)` and count an undetectable text (langdetect raises) as
followed; we call the same library. langdetect samples n-grams at random: its DetectorFactory is seeded once here so
that a response always gets the same answer (the seed is langdetect's process-wide setting).
"""

from functools import lru_cache

# Language names IFEval may ask for (ISO 639-1), as in its instructions_util.LANGUAGE_CODES, plus zh (Tulu data).
IFEVAL_LANGUAGES = (
    "en es pt ar hi fr ru de ja it bn uk th ur ta te bg ko pl he fa vi ne sw kn mr gu pa ml fi zh".split()
)


@lru_cache(maxsize=1)
def _langdetect():
    import langdetect  # lazy: its language profiles load in ~0.4 s, only language checks need them

    langdetect.DetectorFactory.seed = 0
    return langdetect


def detect_language(text):
    """ISO 639-1 code of text by langdetect, or None when langdetect cannot tell (no letters). langdetect's
    "zh-cn" / "zh-tw" are returned as "zh", the only code of IFEVAL_LANGUAGES it spells with a region (IFEval
    itself never asks for Chinese, so its answers are unchanged)."""
    langdetect = _langdetect()
    try:
        code = langdetect.detect(text)
    except langdetect.LangDetectException:
        return None
    return "zh" if code.startswith("zh-") else code
