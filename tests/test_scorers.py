"""Scorers: GSM8K extraction and numeric equality, MATH boxed extraction and equivalence, MBPP code
extraction; run against hand cases and against every reference answer in the data."""
import json
import threading
import time
from pathlib import Path

import pytest

from soka import gsm8k_extract, math_equal, math_last_boxed
from soka.scorers import gsm8k_equal, math_normalize, mbpp_extract_code

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} absent")
# MATH solutions whose last box is empty in the data ("there are $\boxed{}$ primes"; the answer is 0).
EMPTY_BOX = {"train/number_theory/7115.json", "train/number_theory/7117.json"}


def _jsonl(rel):
    return [json.loads(line) for line in open(DATA / rel, encoding="utf-8")]


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### -3", "-3"),
    ("#### $1,080.50", "1080.50"),
    ("The answer is 42.", "42"),
    ("The answer is: **-3.5**", "-3.5"),
    ("The final answer is $7,000", "7000"),
    ("First 3 apples, then 12 more, so she has 15.", "15"),       # last number
    ("so she paid $1,234.", "1234"),                                # $ , and trailing period dropped
    ("lists 3,4,5", "5"),                                           # not a thousands group: 3 numbers
    ("about .5 cups", "0.5"),
    ("#### 18\nQuestion: ... #### 5", "18"),                        # the first #### wins
    ("The answer is 6. Check: 2 + 4 = 6, and 10", "6"),            # "The answer is" beats the last
    ("no digits here", None),
    ("", None),
])
def test_gsm8k_extract(text, expected):
    assert gsm8k_extract(text) == expected


@pytest.mark.parametrize("pred, gold, equal", [
    ("29.00", "29", True), ("29", "29.0", True), ("1,000", "1000", True), ("-3.50", "-3.5", True),
    ("29.5", "29", False), ("-3", "3", False), (None, "3", False), ("abc", "abc", True),
    ("abc", "3", False),
])
def test_gsm8k_equal(pred, gold, equal):
    assert gsm8k_equal(pred, gold) is equal


@needs_data
def test_gsm8k_every_reference_solution_scores_as_its_answer():
    for split in ("train", "test"):
        for r in _jsonl(f"gsm8k/{split}.jsonl"):
            gold = r["answer"].rsplit("####", 1)[1].strip()
            assert gsm8k_equal(gsm8k_extract(r["answer"]), gold), r["answer"][-80:]
            assert gsm8k_extract(r["answer"]) == gold.replace(",", "")


@pytest.mark.parametrize("text, expected", [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{1}, then \boxed{2}", "2"),                       # the last one
    (r"\boxed{\boxed{5}}", "5"),                                      # nested boxes: the inner one
    (r"\boxed{x + \boxed{7}} done", "7"),
    (r"The answer is $\boxed 5$.", "5"),                              # no braces
    (r"\boxed {12}", "12"),
    (r"\fbox{7}", "7"),
    (r"\fbox{7} and \boxed{8}", "8"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}"),
    (r"\boxed{1 + {2", None),                                          # unbalanced
    ("no box", None),
])
def test_math_last_boxed(text, expected):
    assert math_last_boxed(text) == expected


@pytest.mark.parametrize("pred, gold", [
    (r"\frac12", r"\frac{1}{2}"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\tfrac{3}{4}", "0.75"),
    ("0.5", r"\frac{1}{2}"),
    ("1/2", r"\frac{1}{2}"),
    (r"-\frac{1}{16}", "-0.0625"),
    (r"5\text{ cm}", "5"),
    (r"5 \text{cm}^2", "5"),
    (r"864 \mbox{ inches}^2", "864"),
    ("18 ways", "18"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    ("45 degrees", "45"),
    (r"10\%", "10"),
    (r"\$18.90", "18.9"),
    ("1,000", "1000"),
    (r"(1, 2]", r"(1,2]"),
    (r"[-\frac12, 3)", "[-0.5, 3)"),
    (r"(-\infty, -2] \cup [2, \infty)", r"(-\infty,-2]\cup[2,\infty)"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    ("2, -3", "-3, 2"),                                               # a list of solutions: any order
    (r"\{1, 2\}", r"\{2, 1\}"),
    (r"12\text{ and }13", "12, 13"),
    (r"\text{(C)}", "C"),
    ("x = 5", "5"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
    (r"\frac{3}{\sqrt{3}}", r"\sqrt3"),
    ("x^2+7x+10", "(x+2)(x+5)"),
    (r"8\pi - 16", r"-16 + 8\pi"),
    ("x - 3z = 0", "3z - x = 0"),
    ("2^{10}", "1024"),
    (r"\sqrt[3]{8}", "2"),
    ("1\\,000", "1000"),
    ("Monday", r"\text{Monday}"),                                    # "day" is no unit here
    ("evelyn", r"\text{Evelyn}"),                                    # words ignore case
    (r"\begin{pmatrix} \frac{1}{2} & 0 \\ 0 & 1 \end{pmatrix}", r"\begin{pmatrix}0.5&0\\0&1\end{pmatrix}"),
])
def test_math_equal(pred, gold):
    assert math_equal(pred, gold)
    assert math_equal(gold, pred)


@pytest.mark.parametrize("pred, gold", [
    ("(1, 2]", "[1, 2]"),                   # interval ends matter
    ("(1, 2)", "1, 2"),                     # a tuple is not a bare list
    ("(2, 1)", "(1, 2)"),                   # tuples are ordered
    ("0.33", r"\frac{1}{3}"),
    ("1.41421356237", r"\sqrt{2}"),         # a rounded decimal is not the exact value
    ("2x", "3x"),
    ("odd", r"\text{even}"),
    ("x^2+7x+11", "(x+2)(x+5)"),
    ("2^{2005}", r"\frac{1}{3}"),           # huge values must not overflow into "equal"
    (r"\frac{1}{0}", r"\frac{2}{0}"),
    ("6", "5"),
    (r"\begin{pmatrix} -18 \\ -49 \end{pmatrix}", r"\begin{pmatrix}-18&-49\end{pmatrix}"),  # column vs row
    (r"\begin{pmatrix} -18 \\ -49 \end{pmatrix}", "(-18, -49)"),
    ("", "5"),
    (None, "5"),
])
def test_math_not_equal(pred, gold):
    assert not math_equal(pred, gold)


def test_math_normalize_steps():
    assert math_normalize(r"\dfrac12") == r"\frac{1}{2}"
    assert math_normalize(r" \left( 1, 2 \right) ") == "(1,2)"
    assert math_normalize(r"\frac1{2}") == r"\frac{1}{2}"
    assert math_normalize(r"\sqrt2") == r"\sqrt{2}"
    assert math_normalize(".5") == "0.5"
    assert math_normalize(r"\text{Evelyn}") == "Evelyn"         # a lone \text{} is the answer
    assert math_normalize("7.") == "7"


def test_math_sympy_timeout_off_the_main_thread():
    """A comparison that cannot finish returns False at its deadline, from a worker thread, and
    the next comparison still works (the child is restarted)."""
    out = {}

    def work():
        t = time.monotonic()
        out["hang"] = math_equal("10^{10^{10}}", "5", timeout=1.0)
        out["seconds"] = time.monotonic() - t
        out["after"] = math_equal(r"\sqrt{8}", r"2\sqrt{2}")

    th = threading.Thread(target=work)
    th.start()
    th.join(120)
    assert out["hang"] is False
    assert out["seconds"] < 1.0 + 60   # the deadline, plus at most a cold start of the sympy child
    assert out["after"] is True


@needs_data
def test_math_reference_answers():
    """Every MATH-500 `answer` equals the last box of its solution; every MATH gold has a box,
    normalizes to something non-empty (two empty boxes in the data aside), and normalizing twice
    changes nothing."""
    for r in _jsonl("math/math500.jsonl"):
        assert math_equal(r["answer"], math_last_boxed(r["solution"])), r["unique_id"]
    for r in _jsonl("math/test.jsonl") + _jsonl("math/train.jsonl"):
        gold = math_last_boxed(r["solution"])
        assert gold is not None, r["unique_id"]
        if r["unique_id"] not in EMPTY_BOX:
            assert math_normalize(gold) != "", r["unique_id"]
        assert math_normalize(math_normalize(gold)) == math_normalize(gold), r["unique_id"]


@pytest.mark.parametrize("text, expected", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nThis works.", "def f():\n    return 1\n"),
    ("```\nx = 1\n```", "x = 1\n"),
    ("```py\nx = 2\n```\n```python\nx = 3\n```", "x = 2\n"),       # the first block
    ("```python\ndef g(): pass", "def g(): pass"),                  # unclosed fence
    ("def h(): pass\n[DONE] trailing", "def h(): pass\n"),
    ("def k(): pass", "def k(): pass"),
])
def test_mbpp_extract_code(text, expected):
    assert mbpp_extract_code(text) == expected
