"""Verifiers, batch verification and RLVR loading (the nanotulu/rewards package).

Every expected score below was decided by hand from the instruction's wording (IFEval's / Tulu's definitions),
not by running the code under test."""

import json
import os
import signal
import threading
import time

import pytest

from nanotulu import rewards
from nanotulu.rewards import ifeval
from nanotulu.rewards import math as math_verifier
from nanotulu.rewards import pool as reward_pool
from nanotulu.rewards import (
    IFEVAL_INSTRUCTIONS,
    TULU_IF_FUNCTIONS,
    VERIFIERS,
    load_rlvr_rows,
    reward,
    verify,
    verify_batch,
)


@pytest.fixture(scope="module", autouse=True)
def stop_worker_pool_after_module():
    yield
    rewards.shutdown_pool()  # do not leave idle workers to the rest of the test session


def ifeval_gt(iid, **kwargs):
    return json.dumps({"instruction_id_list": [iid], "kwargs": [kwargs]})


# ---------------------------------------------------------------------------------------------------------------------
# gsm8k
# ---------------------------------------------------------------------------------------------------------------------

GSM8K_CASES = [
    # (response, ground truth, expected)
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72", "72", 1.0),
    ("Each box costs $1,250 and he buys 3, so he pays 3 * 1,250 = $3,750.", "3750", 1.0),
    ("The company made 1,234,567 dollars.", "1234567", 1.0),
    ("The total is 3,750 dollars.", "375", 0.0),  # the comma is a thousands separator, not a decimal point
    ("The temperature falls 5 degrees below zero, so it is -5 degrees.", "-5", 1.0),
    ("It is -5 degrees.", "5", 0.0),
    ("She read pages 10-12 today.", "12", 1.0),  # a range: the dash is not a minus sign
    ("He has 0.5 of the pie left, i.e. 0.50.", "0.5", 1.0),
    ("Each costs $18.00.", "18", 1.0),  # 18.00 == 18
    ("So the answer is 18.", "18", 1.0),  # sentence-final period
    ("She pays 7.5 dollars.", "7", 0.0),
    ("1/2 of the apples are red.", "0.5", 0.0),  # gsm8k takes the last number (2), it does not evaluate fractions
    ("I am not sure how to solve this.", "4", 0.0),
    ("First 12, then 15, finally the answer is 20.", "15", 0.0),  # only the last number counts
    ("The temperature is \u22125 degrees.", "-5", 1.0),  # U+2212, the typeset minus sign
    ("The temperature is \u22125 degrees.", "5", 0.0),
    ("It is -5 degrees.", "\u22125", 1.0),  # a ground truth written with U+2212
    ("She read pages 10\u201312 today.", "12", 1.0),  # an en dash is a range, not a minus
]


@pytest.mark.parametrize("response,gt,expected", GSM8K_CASES)
def test_gsm8k(response, gt, expected):
    assert verify("gsm8k", response, gt) == expected


# ---------------------------------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------------------------------

MATH_CASES = [
    (r"We get $x = \frac{1}{2}$, so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", 1.0),
    (r"Therefore the probability is $\boxed{0.5}$.", r"\frac{1}{2}", 1.0),  # decimal vs fraction
    (r"Therefore the probability is $\boxed{\dfrac12}$.", r"\frac{1}{2}", 1.0),
    (r"The answer is $\boxed{\frac{1}{3}}$.", r"\frac{1}{2}", 0.0),
    (r"The answer is $\boxed{0.33}$.", r"\frac{1}{3}", 0.0),
    (r"Final Answer: The final answer is $\frac{\sqrt{2}}{2}$. I hope it is correct.", r"\frac{\sqrt2}{2}", 1.0),
    (r"Final Answer: The final answer is $\sqrt{2}$. I hope it is correct.", r"\frac{\sqrt2}{2}", 0.0),
    (r"The side is $5$ and the area is $25\text{ cm}^2$", "25", 1.0),  # last $...$, units dropped
    (r"The length is \boxed{12 \text{ inches}}.", "12", 1.0),
    (r"So the angle is $\boxed{90^\circ}$.", "90", 1.0),
    (r"The point is $\boxed{(3, -1)}$.", "(3,-1)", 1.0),
    (r"The point is $\boxed{(3, 1)}$.", "(3,-1)", 0.0),
    (r"The solutions are $\boxed{x = 5}$.", "5", 1.0),
    (r"The expression factors as $\boxed{(x+2)(x+5)}$.", r"x^2+7x+10", 1.0),
    (r"The interval is $\boxed{[-2, 7]}$.", "[-2,7]", 1.0),
    (r"The interval is $\boxed{(-2, 7)}$.", "[-2,7]", 0.0),
    (r"It costs \boxed{\$18.90}.", r"\$18.90", 1.0),
    (r"So the total is $\$18.90$.", r"\$18.90", 1.0),  # an escaped dollar inside math mode is the currency sign
    (r"So the total is $\$18.90$.", "18.90", 1.0),
    (r"So the total is $\$18.80$.", "18.90", 0.0),
    (r"The answer is $\boxed{\frac{\pi}{4}}$", r"\frac{\pi}{4}", 1.0),
    (r"The answer is $\boxed{\frac{\pi}{2}}$", r"\frac{\pi}{4}", 0.0),
    ("the answer is 3/4", r"\frac{3}{4}", 1.0),  # raw text, no LaTeX
    ("I give up.", r"\frac{3}{4}", 0.0),
    # The last \boxed wins over an earlier one, and over a "Final Answer" line.
    (r"First guess \boxed{2}, corrected: \boxed{3}", "3", 1.0),
    (r"So $x = \boxed{-3}$.", "3", 0.0),  # sign matters
    (r"First guess \boxed{3}, corrected: \boxed{2}", "3", 0.0),
]


@pytest.mark.parametrize("response,gt,expected", MATH_CASES)
def test_math(response, gt, expected):
    assert verify("math", response, gt) == expected


def test_math_hang_in_process_is_cut_by_math_verify_timeout(monkeypatch):
    # workers=0 has no pool to kill a hanging answer: math-verify's own SIGALRM timeout must stop it.
    monkeypatch.setattr(math_verifier, "MATH_TIMEOUT_S", 1)
    t0 = time.monotonic()
    assert verify("math", HANGING, "1") == 0.0
    assert time.monotonic() - t0 < 10


def test_math_extraction_order():
    ext = rewards.extract_math_answer
    assert ext(r"so \boxed{\frac{a}{b}} and $c$") == (r"\frac{a}{b}", "boxed")  # nested braces kept
    assert ext("Final Answer: The final answer is $7$. I hope it is correct.") == ("7", "final_answer")
    assert ext("Final Answer: 12") == ("12", "final_answer")
    assert ext(r"we have $a=1$ and then $b = 2$ at last") == ("b = 2", "dollars")
    assert ext("  42 ") == ("42", "raw")
    assert ext(r"cut off \boxed{3} then \boxed{4") == ("3", "boxed")  # unbalanced last box: the previous one
    assert ext(r"It costs $\$18.90$ in all") == (r"\$18.90", "dollars")  # \$ neither opens nor closes math mode
    assert ext(r"from \$5 to $x = 7$") == ("x = 7", "dollars")
    assert ext(r"pay \$5 or \$6") == (r"pay \$5 or \$6", "raw")


# ---------------------------------------------------------------------------------------------------------------------
# ifeval: every one of the 25 instruction types, followed and not followed
# ---------------------------------------------------------------------------------------------------------------------

IFEVAL_CASES = {
    # id: (kwargs, a response that follows it, a response that does not)
    "keywords:existence": (
        {"keywords": ["solar", "battery"]},
        "Solar panels charge the Battery during the day.",
        "Solar panels work during the day.",
    ),
    "keywords:frequency": (
        {"keyword": "moon", "frequency": 3, "relation": "at least"},
        "The moon rose. The Moon was full. I love the moon.",
        "The moon rose over the hills.",
    ),
    "keywords:forbidden_words": (
        {"forbidden_words": ["cheap", "free"]},
        "The freedom to choose is a good thing.",  # "freedom" is not the word "free"
        "This is a free offer.",
    ),
    "keywords:letter_frequency": (
        {"letter": "z", "let_frequency": 3, "let_relation": "less than"},
        "Zebras graze.",  # z, z: 2 < 3 (case-insensitive)
        "Zebras graze in a zoo.",  # 3 z's
    ),
    "language:response_language": (
        {"language": "fr"},
        "Je pense que le chat est sur la table et que nous sommes en retard pour le dîner.",
        "I think the cat is on the table and that we are late for dinner.",
    ),
    "length_constraints:number_sentences": (
        {"num_sentences": 3, "relation": "less than"},
        "Dr. Smith arrived at 3.30 p.m. today. He left early!",  # 2 sentences: Dr., 3.30 and p.m. do not end one
        "It rained. We stayed in. We played cards.",
    ),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2},
        "First paragraph about dogs.\n***\nSecond paragraph about cats.",
        "First paragraph.\n***\nSecond.\n***\nThird.",
    ),
    "length_constraints:number_words": (
        {"num_words": 5, "relation": "at least"},
        "I really like green apples.",
        "I like apples.",
    ),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "Cats are great pets.\n\nHowever, dogs are loyal.",
        "Cats are great pets.\n\nDogs are loyal, however.",
    ),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2},
        "Dear [name], your order ships to [address].",
        "Dear [name], your order ships soon.",
    ),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."},
        "Thanks for reading.\n\nP.S. See you at the party.",
        "Thanks for reading. See you at the party.",
    ),
    "detectable_format:number_bullet_lists": (
        {"num_bullets": 2},
        "My picks:\n* Apples\n* Pears",
        "My picks:\n* Apples\n* Pears\n- Plums",
    ),
    "detectable_format:constrained_response": (
        {},
        "My answer is yes.",
        "Yes, definitely.",
    ),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2},
        "Remember *the first rule* and *the second rule*.",
        "Remember *the first rule* only.",
    ),
    "detectable_format:multiple_sections": (
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nIntro text.\nSECTION 2\nMain text.",
        "SECTION 1\nAll of the text.",
    ),
    "detectable_format:json_format": (
        {},
        '```json\n{"name": "Ada", "age": 36}\n```',
        'Here is the JSON: {"name": "Ada"}',
    ),
    "detectable_format:title": (
        {},
        "<<Ode to Autumn>>\nLeaves fall softly.",
        "Ode to Autumn\nLeaves fall softly.",
    ),
    "combination:two_responses": (
        {},
        "Paris is the capital.\n******\nThe capital is Paris.",
        "Paris is the capital.\n******\nParis is the capital.",  # the two responses must differ
    ),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "Write a haiku about rain."},
        "Write a haiku about rain. Soft rain on the roof...",
        "Here is a haiku about rain: soft rain on the roof.",
    ),
    "startend:end_checker": (
        {"end_phrase": "Is there anything else I can help with?"},
        "Water boils at 100 C. Is there anything else I can help with?",
        "Is there anything else I can help with? Water boils at 100 C.",
    ),
    "change_case:capital_word_frequency": (
        {"capital_frequency": 2, "capital_relation": "at least"},
        "This is VERY IMPORTANT news.",
        "This is Very important news.",
    ),
    "change_case:english_capital": (
        {},
        "THE WEATHER IS NICE TODAY.",
        "The weather is nice today.",
    ),
    "change_case:english_lowercase": (
        {},
        "the weather is nice today.",
        "the weather is nice today in Paris.",
    ),
    "punctuation:no_comma": (
        {},
        "I bought apples and pears and plums.",
        "I bought apples, pears and plums.",
    ),
    "startend:quotation": (
        {},
        '"The journey of a thousand miles begins with one step."',
        'The journey of a thousand miles begins with "one step."',
    ),
}


def test_ifeval_table_lists_all_25_types():
    assert len(IFEVAL_INSTRUCTIONS) == 25
    assert set(IFEVAL_CASES) == set(IFEVAL_INSTRUCTIONS)
    for iid in IFEVAL_INSTRUCTIONS:  # the documented list in the comment above the table names every id
        assert iid in open(ifeval.__file__).read().split("IFEVAL_INSTRUCTIONS = {")[0]


@pytest.mark.parametrize("iid", sorted(IFEVAL_CASES))
def test_ifeval_instruction_followed_and_not(iid):
    kwargs, good, bad = IFEVAL_CASES[iid]
    assert verify("ifeval", good, ifeval_gt(iid, **kwargs)) == 1.0
    assert verify("ifeval", bad, ifeval_gt(iid, **kwargs)) == 0.0


def test_ifeval_fraction_and_all_or_nothing():
    gt = json.dumps({
        "instruction_id_list": ["change_case:english_lowercase", "length_constraints:number_words"],
        "kwargs": [{}, {"relation": "less than", "num_words": 50}],
    })
    assert verify("ifeval", "a short lowercase answer.", gt) == 1.0
    assert verify("ifeval", "A short answer.", gt) == 0.5  # one of two followed
    assert verify("ifeval", "A short answer.", gt, ifeval_all_or_nothing=True) == 0.0
    assert verify("ifeval", ("the cat sat on the mat " * 10).strip(), gt) == 0.5  # lowercase English, 60 words
    # An empty answer follows nothing (else "no commas" would reward silence); reasoning before </think> is ignored.
    assert verify("ifeval", "   ", ifeval_gt("punctuation:no_comma")) == 0.0
    thinking = "<think>First, commas, commas.</think>No commas here."
    assert verify("ifeval", thinking, ifeval_gt("punctuation:no_comma")) == 1.0


def test_ifeval_accepts_parsed_objects_nulls_and_ifevalg_format():
    obj = {"instruction_id_list": ["punctuation:no_comma", "detectable_format:title"], "kwargs": [{}, {}]}
    assert verify("ifeval", "<<Title>> no commas", obj) == 1.0
    # HF parquet of IFEval pads every kwargs dict with nulls, and stores counts as floats.
    padded = {"instruction_id_list": ["length_constraints:number_words"],
              "kwargs": [{"num_words": 3.0, "relation": "at least", "keywords": None, "language": None}]}
    assert verify("ifeval", "one two three", padded) == 1.0
    # open-instruct IFEvalG: a Python-literal list holding one dict with "instruction_id".
    ifevalg = "[{'instruction_id': ['punctuation:no_comma'], 'kwargs': [None]}]"
    assert verify("ifeval", "fine", ifevalg) == 1.0
    assert verify("ifeval", "fine, thanks", ifevalg) == 0.0


def test_ifeval_bad_ground_truth_errors():
    with pytest.raises(ValueError, match="unknown ifeval instruction id 'keywords:exist'"):
        verify("ifeval", "x", ifeval_gt("keywords:exist", keywords=["a"]))
    with pytest.raises(ValueError, match="missing.*num_words"):
        verify("ifeval", "x", ifeval_gt("length_constraints:number_words", relation="at least"))
    with pytest.raises(ValueError, match="relation must be one of"):
        verify("ifeval", "x", ifeval_gt("length_constraints:number_words", num_words=5, relation="more than"))
    with pytest.raises(ValueError, match="neither JSON"):
        verify("ifeval", "x", '{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]')
    with pytest.raises(ValueError, match="one per instruction id"):
        verify("ifeval", "x", json.dumps({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}))


def test_sentence_and_word_counts():
    # IFEval counts sentences with NLTK's Punkt English model: abbreviations it learned (Mr., p.m.), acronyms before
    # a lower-case word, ellipses mid-sentence and decimals do not end a sentence; before a capitalised sentence
    # starter ("He") even "U.S." does; "e.g." is not among its abbreviations; a list number "1." is a sentence.
    text = "Mr. Brown lives in the U.S.A. He likes tea... and cake! Does he?"
    assert rewards.split_sentences(text) == ["Mr. Brown lives in the U.S.A.", "He likes tea... and cake!", "Does he?"]
    assert rewards.split_sentences("He moved to the U.S. He likes it.") == ["He moved to the U.S.", "He likes it."]
    assert len(rewards.split_sentences("The U.S. economy grew by 2.5 percent at 3 p.m. today.")) == 1
    assert rewards.split_sentences("Pi is about 3.14. See example.com, e.g. the history.") == [
        "Pi is about 3.14.", "See example.com, e.g.", "the history."]
    assert rewards.split_sentences("Steps:\n1. Boil water.\n2. Add tea.") == [
        "Steps:\n1.", "Boil water.", "2.", "Add tea."]
    assert len(rewards.split_sentences("no final stop here")) == 1
    assert rewards.count_words("Don't stop-believing, 2 times!") == 6  # \w+ tokens: Don t stop believing 2 times


def test_capital_words_tokenized_like_nltk_word_tokenize():
    # IFEval counts all-capital words among nltk.word_tokenize tokens: "U.S." is one token, a sentence-final "P.S."
    # loses its period, "O'Brien" and "US-Dollar" stay whole (US-Dollar is not all capitals), "DON'T" -> DO, N'T.
    text = "The U.S. and O'Brien pay in US-Dollar. DON'T ask about the P.S."
    assert ifeval.word_tokenize(text) == ["The", "U.S.", "and", "O'Brien", "pay", "in", "US-Dollar", ".",
                                          "DO", "N'T", "ask", "about", "the", "P.S", "."]
    capitals = [w for w in ifeval.word_tokenize(text) if w.isupper()]
    assert capitals == ["U.S.", "DO", "N'T", "P.S"]  # \w+ words would have given 7: U S O US DON T P S
    gt = lambda relation, n: ifeval_gt("change_case:capital_word_frequency", capital_relation=relation,
                                       capital_frequency=n)
    assert verify("ifeval", text, gt("at least", 4)) == 1.0
    assert verify("ifeval", text, gt("less than", 5)) == 1.0
    assert verify("ifeval", text, gt("at least", 5)) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# ifeval: Tulu 3 RLVR-IFeval ground truth ({"func_name": ..., args, unused args null})
# ---------------------------------------------------------------------------------------------------------------------

TULU_ARG_NAMES = ["N", "quantifier", "end_phrase", "keyword_list", "word", "forbidden_words", "letter", "i",
                  "first_word", "postscript_marker", "options", "section_splitter", "original_prompt", "language"]

TULU_CASES = {
    "verify_keywords": ({"keyword_list": ["rain", "cloud"]}, "Rain falls from a cloud.", "Rain falls."),
    "verify_keyword_frequency": ({"word": "cat", "N": 2}, "The cat saw another cat.",
                                 "The cat sat. Cats nap. The cat ran. Cat."),  # exactly N: 3 is too many
    "validate_forbidden_words": ({"forbidden_words": ["very"]}, "It is quite good.", "It is Very good."),
    "verify_letter_frequency": ({"letter": "a", "N": 3}, "banana", "bananas and"),  # exact count, case-sensitive
    "validate_response_language": ({"language": "de"}, "Ich glaube, dass die Katze nicht auf dem Tisch ist.",
                                   "I believe that the cat is not on the table."),
    "verify_paragraph_count": ({"N": 2}, "Para one.\n* * *\nPara two.", "Para one.\n***\nPara two."),
    "validate_word_constraint": ({"N": 10, "quantifier": "around"}, " ".join(["w"] * 11), " ".join(["w"] * 13)),
    "verify_sentence_constraint": ({"N": 2, "quantifier": "at most"}, "One. Two.", "One. Two. Three. Four."),
    "validate_paragraphs": ({"N": 2, "first_word": "Second", "i": 2}, "First part.\n\nSecond part.",
                            "First part.\n\nThird part."),
    "verify_postscript": ({"postscript_marker": "P.S."}, "Bye.\nP.S. Call me.", "Bye. P.S."),
    "validate_placeholders": ({"N": 1}, "Hi [name].", "Hi you."),
    "verify_bullet_points": ({"N": 3}, "* a\n* b\n- c", "* a\n* b"),
    "validate_title": ({}, "<<My Title>> text", "My Title text"),
    "validate_choice": ({"options": ["My answer is yes.", "My answer is no."]}, "My answer is no.", "Maybe."),
    "validate_highlighted_sections": ({"N": 1}, "This is *key*.", "This is key."),
    "validate_sections": ({"N": 2, "section_splitter": "Section"}, "Section 1 a\nSection 2 b", "Section 1 a"),
    "validate_json_format": ({}, '{"a": 1}', "```json\n{\"a\": 1}\n```"),  # Tulu's check takes no code fence
    "validate_repeat_prompt": ({"original_prompt": "Name a fruit."}, "Name a fruit. Apple.", "Apple."),
    "validate_two_responses": ({}, "Yes.******No.", "Yes.******Yes."),
    "validate_uppercase": ({}, "ALL CAPS 123.", "Not All Caps."),
    "validate_lowercase": ({}, "all lower 123.", "Not all lower."),
    "validate_frequency_capital_words": ({"N": 2, "quantifier": "at most"}, "USA and UK.", "USA, UK and EU."),
    "validate_end": ({"end_phrase": "Thank you."}, "That is all. Thank you.", "Thank you. That is all."),
    "validate_quotation": ({}, '"Quoted."', "Not quoted."),
    "validate_no_commas": ({}, "No commas here.", "Commas, here."),
}


def tulu_gt(func_name, **args):
    full = {name: None for name in TULU_ARG_NAMES}  # the data set stores every argument, null when unused
    full.update(args)
    return json.dumps({"func_name": func_name, **full})


def test_tulu_table_has_the_25_functions():
    assert set(TULU_CASES) == set(TULU_IF_FUNCTIONS) and len(TULU_IF_FUNCTIONS) == 25


@pytest.mark.parametrize("func_name", sorted(TULU_CASES))
def test_tulu_function_followed_and_not(func_name):
    args, good, bad = TULU_CASES[func_name]
    assert verify("ifeval", good, tulu_gt(func_name, **args)) == 1.0
    assert verify("ifeval", bad, tulu_gt(func_name, **args)) == 0.0


def test_tulu_bad_ground_truth_errors():
    with pytest.raises(ValueError, match="unknown ifeval func_name 'validate_lowercas'"):
        verify("ifeval", "x", tulu_gt("validate_lowercas"))
    with pytest.raises(ValueError, match="missing.*N"):
        verify("ifeval", "x", tulu_gt("validate_placeholders"))
    with pytest.raises(ValueError, match="unknown.*N"):
        verify("ifeval", "x", tulu_gt("validate_lowercase", N=3))


# ---------------------------------------------------------------------------------------------------------------------
# language detection (langdetect, as IFEval)
# ---------------------------------------------------------------------------------------------------------------------

LANGUAGE_CASES = [
    ("The weather is lovely and we are going to the park.", "en"),
    ("El perro de mi hermano es muy grande y come mucho.", "es"),
    ("O cachorro do meu irmão é muito grande e não come.", "pt"),
    ("Le chien de mon frère est très grand et il mange beaucoup.", "fr"),
    ("Der Hund meines Bruders ist sehr groß und er frisst viel.", "de"),
    ("Il cane di mio fratello è molto grande e mangia della carne.", "it"),
    ("Mbwa wa kaka yangu ni mkubwa sana na anakula sana.", "sw"),
    ("Veljeni koira on hyvin iso ja se syö paljon, mutta se on kiltti.", "fi"),
    ("Pies mojego brata jest bardzo duży i dużo je.", "pl"),
    ("Con chó của anh trai tôi rất to và ăn rất nhiều.", "vi"),
    ("Собака моего брата очень большая.", "ru"),
    ("Собака мого брата дуже велика і їсть багато.", "uk"),
    ("Кучето на брат ми е много голямо и това е добре.", "bg"),
    ("我哥哥的狗很大，吃得很多。", "zh"),
    ("兄の犬はとても大きくて、たくさん食べます。", "ja"),
    ("우리 형의 개는 아주 크고 많이 먹어요.", "ko"),
    ("สุนัขของพี่ชายฉันตัวใหญ่มาก", "th"),
    ("كلب أخي كبير جدا ويأكل كثيرا.", "ar"),
    ("سگ برادرم خیلی بزرگ است و زیاد غذا می‌خورد.", "fa"),
    ("میرے بھائی کا کتا بہت بڑا ہے۔", "ur"),
    ("मेरे भाई का कुत्ता बहुत बड़ा है।", "hi"),
    ("माझ्या भावाचा कुत्रा खूप मोठा आहे.", "mr"),
    ("मेरो दाइको कुकुर धेरै ठूलो छ।", "ne"),
    ("הכלב של אחי גדול מאוד.", "he"),
    ("আমার ভাইয়ের কুকুর খুব বড়।", "bn"),
    ("ਮੇਰੇ ਭਰਾ ਦਾ ਕੁੱਤਾ ਬਹੁਤ ਵੱਡਾ ਹੈ।", "pa"),
    ("મારા ભાઈનો કૂતરો ખૂબ મોટો છે.", "gu"),
    ("என் சகோதரனின் நாய் மிகவும் பெரியது.", "ta"),
    ("నా సోదరుడి కుక్క చాలా పెద్దది.", "te"),
    ("ನನ್ನ ಸಹೋದರನ ನಾಯಿ ತುಂಬಾ ದೊಡ್ಡದು.", "kn"),
    ("എന്റെ സഹോദരന്റെ നായ വളരെ വലുതാണ്.", "ml"),
]


# Texts that a script + function-word heuristic got wrong: a Hindi text with the letter छ inside words (read as
# Nepali), a Marathi haiku without Marathi's frequent words (read as Hindi), Bulgarian without its distinctive words
# (read as Russian), short Italian (read as English).
HARD_LANGUAGE_CASES = [
    ("मुझे यह किताब बहुत अच्छी लगी और मैंने अपने दोस्त से पूछा कि क्या वह इसे पढ़ना चाहेगा।", "hi"),
    ("पावसाच्या सरी\nमातीचा सुगंध दरवळे\nमन हरखून जाई", "mr"),
    ("Времето днес е хубаво и отиваме на разходка в парка с децата.", "bg"),
    ("Ciao, come stai oggi?", "it"),
]


@pytest.mark.parametrize("text,code", LANGUAGE_CASES + HARD_LANGUAGE_CASES)
def test_detect_language(text, code):
    assert rewards.detect_language(text) == code


def test_language_instructions_use_detection():
    gt = ifeval_gt("language:response_language", language="hi")
    assert verify("ifeval", HARD_LANGUAGE_CASES[0][0], gt) == 1.0
    assert verify("ifeval", HARD_LANGUAGE_CASES[1][0], gt) == 0.0  # Marathi, not Hindi
    assert verify("ifeval", "12345 !!!", gt) == 1.0  # no letters: langdetect cannot tell, IFEval counts it followed
    assert rewards.detect_language("12345 !!!") is None
    # change_case:english_lowercase needs English too: lower-case Italian does not follow it.
    assert verify("ifeval", "ciao, come stai oggi? grazie mille per il tuo aiuto.",
                  ifeval_gt("change_case:english_lowercase")) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# string_match, several verifiers, reward
# ---------------------------------------------------------------------------------------------------------------------


def test_string_match():
    assert verify("string_match", "Let me think. <answer>The Eiffel Tower!</answer>", "eiffel tower") == 1.0
    assert verify("string_match", "<answer>Paris</answer> ... <answer>Lyon</answer>", "Lyon") == 1.0  # the last
    assert verify("string_match", "<answer>Big Ben</answer>", "eiffel tower") == 0.0
    assert verify("string_match", "an apple", "Apple.") == 1.0  # no tags: the whole response
    assert verify("string_match", "an apple a day", "apple") == 0.0


def test_several_verifiers_mean_and_list_ground_truth():
    # One ground truth per verifier: gsm8k right (1), ifeval "no comma" broken (0) -> mean 0.5.
    gt = ["42", ifeval_gt("punctuation:no_comma")]
    assert verify(["gsm8k", "ifeval"], "Well, the answer is 42", gt) == 0.5
    assert verify(["gsm8k", "ifeval"], "The answer is 42", gt) == 1.0
    # One shared ground truth: gsm8k and math both check "7".
    assert verify(["gsm8k", "math"], r"so \boxed{7}", "7") == 1.0
    assert verify(["GSM8K", "Math"], r"so \boxed{6}", "7") == 0.0  # names are case-insensitive
    with pytest.raises(ValueError, match="unknown verifier 'code'"):
        verify("code", "x", "y")


def test_reward_scale_and_nonstop_penalty():
    assert reward("gsm8k", "It is 72", "72", True) == 10.0  # Tulu 3 scale
    assert reward("gsm8k", "It is 71", "72", True) == 0.0
    assert reward("gsm8k", "It is 72", "72", True, scale=1.0) == 1.0
    assert reward("gsm8k", "It is 72", "72", False) == 10.0  # no penalty set: cut-off answers are scored as usual
    assert reward("gsm8k", "It is 72 and then", "72", False, nonstop_penalty=-10.0) == -10.0
    assert reward("gsm8k", "It is 72", "72", False, nonstop_penalty=0.0) == 0.0
    assert rewards.score_to_reward(0.5, True, scale=10.0) == 5.0
    assert set(VERIFIERS) == {"gsm8k", "math", "ifeval", "string_match"}


# ---------------------------------------------------------------------------------------------------------------------
# verify_batch
# ---------------------------------------------------------------------------------------------------------------------

# 9^(9^(9^9)) makes sympy work for a very long time: a real hanging answer.
HANGING = r"The answer is $\boxed{9^{9^{9^{9}}}}$."


def mixed_batch():
    datasets, responses, gts, expected = [], [], [], []
    for response, gt, exp in GSM8K_CASES:
        datasets.append("gsm8k"), responses.append(response), gts.append(gt), expected.append(exp)
    for response, gt, exp in MATH_CASES[:8]:
        datasets.append("math"), responses.append(response), gts.append(gt), expected.append(exp)
    for iid, (kwargs, good, bad) in sorted(IFEVAL_CASES.items()):
        for response, exp in ((good, 1.0), (bad, 0.0)):
            datasets.append("ifeval"), responses.append(response), gts.append(ifeval_gt(iid, **kwargs))
            expected.append(exp)
    return datasets, responses, gts, expected


def test_verify_batch_in_process_matches_expected():
    datasets, responses, gts, expected = mixed_batch()
    scores, stats = verify_batch(datasets, responses, gts, workers=0)
    assert scores == expected
    assert stats["ok"] == len(expected) and stats["timeout"] == stats["error"] == stats["too_long"] == 0


def test_verify_batch_workers_match_expected():
    datasets, responses, gts, expected = mixed_batch()
    scores, stats = verify_batch(datasets, responses, gts, workers=2, timeout=60.0, chunk_size=4)
    assert scores == expected
    assert stats["ok"] == len(expected) and stats["workers_restarted"] == 0


def test_verify_batch_workers_survive_hang_error_and_oversize(caplog):
    # Cheap answers (microseconds each, so a short timeout is safe even on a loaded machine), plus: a hanging
    # answer, a malformed ground truth (raises in the verifier), an enormous answer and a non-string answer.
    # Each of the four scores 0 and is counted; the rest of the batch is scored normally.
    datasets, responses, gts, expected = [], [], [], []
    for (response, gt, exp), (iid, (kwargs, good, bad)) in zip(GSM8K_CASES, sorted(IFEVAL_CASES.items())):
        datasets += ["gsm8k", "ifeval", "ifeval"]
        responses += [response, good, bad]
        gts += [gt, ifeval_gt(iid, **kwargs), ifeval_gt(iid, **kwargs)]
        expected += [exp, 1.0, 0.0]
    datasets[5:5] = ["math", "ifeval", "gsm8k", "gsm8k"]
    responses[5:5] = [HANGING, "fine", "7 " * 60_000, None]
    gts[5:5] = ["1", '{"instruction_id_list": ["no_such:id"], "kwargs": [{}]}', "7", "7"]
    expected[5:5] = [0.0, 0.0, 0.0, 0.0]
    t0 = time.monotonic()
    scores, stats = verify_batch(datasets, responses, gts, workers=2, timeout=2.0, max_chars=100_000, chunk_size=4)
    elapsed = time.monotonic() - t0
    assert scores == expected
    assert stats["timeout"] == 1 and stats["error"] == 2 and stats["too_long"] == 1, stats
    assert stats["ok"] == len(expected) - 4 and stats["workers_restarted"] == 1, stats
    assert elapsed < 20  # the hang cost about one timeout, not minutes
    assert "unknown ifeval instruction id 'no_such:id'" in caplog.text  # the first error's reason is logged
    # The pool is reused by the next call and still works after the restart.
    pool = reward_pool._POOL
    scores, stats = verify_batch(["gsm8k"] * 3, ["so 1", "so 2", "so 4"], ["1", "2", "3"], workers=2, timeout=1.0)
    assert scores == [1.0, 1.0, 0.0] and stats["ok"] == 3
    assert reward_pool._POOL is pool


def test_verify_batch_worker_killed_mid_answer():
    # As if the OOM killer struck: the answer each worker held scores 0 (error), new workers take the rest.
    # One answer per chunk, the two hanging answers first: both workers are busy on them when they are killed.
    verify_batch(["gsm8k"], ["1"], ["1"], workers=2, timeout=30.0)  # make sure the pool is up
    reward_pool._POOL.wait_until_ready(120.0)  # a worker replaced by an earlier test may still be loading
    pids = [p.pid for p in reward_pool._POOL.procs]

    def kill_busy_workers():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    timer = threading.Timer(1.0, kill_busy_workers)
    timer.start()
    try:
        scores, stats = verify_batch(["math", "math"] + ["gsm8k"] * 4, [HANGING, HANGING] + ["it is 5"] * 4,
                                     ["1", "1"] + ["5"] * 4, workers=2, timeout=30.0, chunk_size=1)
    finally:
        timer.cancel()
    assert scores == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert stats["error"] == 2 and stats["ok"] == 4 and stats["workers_restarted"] == 2, stats
    assert stats["seconds"] < 15  # killed at ~1 s, far before the 30 s timeout


def test_verify_batch_length_mismatch():
    with pytest.raises(ValueError, match="2 datasets, 1 responses"):
        verify_batch(["gsm8k", "gsm8k"], ["1"], ["1", "2"], workers=0)


# ---------------------------------------------------------------------------------------------------------------------
# load_rlvr_rows
# ---------------------------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_rlvr_rows_jsonl_and_parquet(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": "42"}],
         "ground_truth": "42", "dataset": "gsm8k"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1/2 as LaTeX?"}],
         "ground_truth": r"\frac{1}{2}", "dataset": "MATH"},
        {"messages": [{"role": "user", "content": "Write in lowercase."}],
         "ground_truth": tulu_gt("validate_lowercase"), "dataset": ["ifeval"]},
    ]
    loaded = load_rlvr_rows(write_jsonl(tmp_path / "rl.jsonl", rows))
    assert [r["prompt_messages"] for r in loaded] == [
        [{"role": "user", "content": "What is 6*7?"}],  # the reference answer is dropped
        rows[1]["messages"],
        rows[2]["messages"],
    ]
    assert [r["dataset"] for r in loaded] == ["gsm8k", "math", ["ifeval"]]
    assert [r["source"] for r in loaded] == [f"{tmp_path / 'rl.jsonl'}:{i}" for i in (1, 2, 3)]
    assert loaded[0]["ground_truth"] == "42"

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{**r, "dataset": r["dataset"] if isinstance(r["dataset"], str) else "ifeval"}
                                  for r in rows])
    pq.write_table(table, tmp_path / "rl.parquet")
    loaded_pq = load_rlvr_rows(str(tmp_path / "rl.parquet"))
    assert [r["prompt_messages"] for r in loaded_pq] == [r["prompt_messages"] for r in loaded]
    assert loaded_pq[2]["source"].endswith("rl.parquet:3")


GOOD = {"messages": [{"role": "user", "content": "q"}], "ground_truth": "1", "dataset": "gsm8k"}


@pytest.mark.parametrize("bad_row,message", [
    ({"messages": [{"role": "user", "content": "q"}], "dataset": "gsm8k"}, "missing field 'ground_truth'"),
    ({**GOOD, "dataset": "code_contests"}, "field 'dataset': unknown verifier 'code_contests'"),
    ({**GOOD, "ground_truth": "seventy-two"}, "field 'ground_truth': gsm8k ground truth must be a number"),
    ({**GOOD, "dataset": "ifeval", "ground_truth": '{"instruction_id_list": ["punctuation:no_comma"]'},
     "field 'ground_truth': ifeval ground truth is neither JSON"),
    ({**GOOD, "dataset": "ifeval", "ground_truth": ifeval_gt("keywords:frequency", keyword="a", frequency=2)},
     "keywords:frequency: arguments"),
    ({**GOOD, "dataset": "ifeval", "ground_truth": ifeval_gt("language:response_language", language="xx")},
     "language must be one of"),
    ({**GOOD, "messages": [{"role": "assistant", "content": "42"}]}, "must end with a user message"),
    ({**GOOD, "messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\] must be a dict with role"),
    ({**GOOD, "dataset": ["gsm8k", "math"], "ground_truth": ["1", ""]}, "math ground truth must be a non-empty"),
])
def test_load_rlvr_rows_errors_name_file_line_field(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad_row])
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{message}"):
        load_rlvr_rows(path)
