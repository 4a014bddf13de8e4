"""Scorers: GSM8K extraction and numeric equality, MATH boxed extraction and equivalence, MBPP code
extraction; run against hand cases and against every reference answer in the data (all of GSM8K, as
shipped; MATH: conftest.py's small files, and the full files with --data-dir)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from soka import gsm8k_extract, math_equal, math_last_boxed
from soka.scorers import gsm8k_equal, math_normalize, mbpp_extract_code

# MATH solutions whose last box is empty in the data ("there are $\boxed{}$ primes"; the answer is 0).
EMPTY_BOX = {"train/number_theory/7115.json", "train/number_theory/7117.json"}


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


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
    ("#### 1,2345", "1"),                                           # a group of 4 digits is no group
    ("it costs 1,2345", "2345"),
    ("1,234,5678", "5678"),
    ("about .5 cups", "0.5"),
    ("#### 18\nQuestion: ... #### 5", "18"),                        # the first #### wins
    ("The answer is 6. Check: 2 + 4 = 6, and 10", "6"),            # "The answer is" beats the last
    ("no digits here", None),
    ("", None),
    ("#### 1{,}296", "1296"),                                       # LaTeX's thousands separator
    (r"The answer is $1{,}296$.", "1296"),
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


def test_gsm8k_every_reference_solution_scores_as_its_answer(gsm8k_rows):
    for split in ("train", "test"):
        for r in gsm8k_rows[split]:
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
    ("2, -3", "2,-3"),                                                # lists: in order (as the graders)
    (r"\{1, 2\}", r"\{1,2\}"),
    (r"\frac{1}{2}, -3", "0.5, -3"),                                 # ... element by element
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
    (r"3\frac{1}{2}", r"\frac{7}{2}"),                                # a mixed number (MATH's prealgebra)
    (r"137 \frac{1}{2}", "137.5"),
    (r"-1\dfrac{4}{5}", "-1.8"),
    ("1{,}296", "1296"),                                             # LaTeX's thousands separator
    ("2^{100}-1", "1267650600228229401496703205375"),
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
    ("10, 4, -2", "4, 10, -2"),             # so are bare lists and sets (Hendrycks, lm-eval, PRM800K)
    ("2, -3", "-3, 2"),
    (r"\{1, 2\}", r"\{2, 1\}"),
    ("2, 3", "2, 3, 3"),
    ("0.33", r"\frac{1}{3}"),
    ("1.41421356237", r"\sqrt{2}"),         # a rounded decimal is not the exact value
    ("2x", "3x"),
    ("odd", r"\text{even}"),
    ("x^2+7x+11", "(x+2)(x+5)"),
    ("2^{2005}", r"\frac{1}{3}"),           # huge values must not overflow into "equal"
    (r"3\frac{1}{2}", r"\frac{3}{2}"),       # a mixed number is a sum, not 3 · 1/2
    ("2^{100}-1", "2^{100}"),               # integers differ exactly, however large
    ("10^{30}+7", "10^{30}"),
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


def test_math_reference_answers(data):
    """Every MATH-500 `answer` equals the last box of its solution; every MATH gold has a box,
    normalizes to something non-empty (two empty boxes in the data aside), and normalizing twice
    changes nothing."""
    for r in _jsonl(data / "math" / "math500.jsonl"):
        assert math_equal(r["answer"], math_last_boxed(r["solution"])), r["unique_id"]
    for r in _jsonl(data / "math" / "test.jsonl") + _jsonl(data / "math" / "train.jsonl"):
        gold = math_last_boxed(r["solution"])
        assert gold is not None, r["unique_id"]
        if r["unique_id"] not in EMPTY_BOX:
            assert math_normalize(gold) != "", r["unique_id"]
        assert math_normalize(math_normalize(gold)) == math_normalize(gold), r["unique_id"]


# ------------------------------------------------------------------- hostile model output

SCORERS = Path(__file__).resolve().parents[1] / "soka" / "scorers.py"


def _in_child(calls, seconds=60):
    """Run [(function name, args)] of soka/scorers.py in a fresh interpreter (loaded by path, so no
    torch) and return the results: a call that holds the GIL for hours cannot be stopped in-process."""
    code = ("import importlib.util, json, sys\n"
            "spec = importlib.util.spec_from_file_location('s', sys.argv[1])\n"
            "s = importlib.util.module_from_spec(spec); spec.loader.exec_module(s)\n"
            "print(json.dumps([getattr(s, f)(*a) for f, a in json.loads(sys.stdin.read())]))\n")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(SCORERS)], input=json.dumps(calls),
                             capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {seconds} s: {calls}")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_huge_exponents_are_not_expanded():
    """1e999999999 would be a Fraction of 10**999999999 (hours, in one C call that holds the GIL)."""
    t = time.monotonic()
    assert _in_child([("math_equal", ["1e999999999", "5"]),
                      ("math_equal", ["1e999999999", "1e999999999"]),      # identical strings still match
                      ("math_equal", [r"\frac{1e999999999}{2}", "5"]),
                      ("gsm8k_equal", ["1e999999999", "5"]),
                      ("gsm8k_equal", ["-1e-999999999", "0"])]) == [False, True, False, False, False]
    assert time.monotonic() - t < 30


@pytest.mark.parametrize("pred, gold, equal", [
    ("1" * 5000, "5", False),               # past int()'s 4,300 digits: was ValueError
    ("1" * 5000, "1" * 5000, True),         # only the identical string matches past the bounds
    (r"\frac{" + "1" * 5000 + "}{3}", "5", False),
    ("0." + "1" * 5000, "0.1", False),
    ("1e3", "1000", True),                  # within the bounds: exact values
    ("2e1000", "20e999", True),
    ("2e1001", "20e1000", False),           # exponent past MAX_EXPONENT: not read as a number
    ("1" * 998, "1" * 998 + ".0", True),    # 999 digits, 1,000 characters: read
    ("1" * 1000, "1" * 1000 + ".0", False), # past MAX_ANSWER_CHARS: only the identical string
], ids=lambda v: v if isinstance(v, bool) or len(v) < 20 else f"{v[:8]}...({len(v)} chars)")
def test_math_numbers_are_bounded(pred, gold, equal):
    assert math_equal(pred, gold) is equal


@pytest.mark.parametrize("pred, gold, equal", [
    ("1" * 5000, "1" * 5000 + ".0", False),
    ("1" * 1000, "1" * 1000 + ".", True),
    ("1" * 1001, "1" * 1001 + ".", False),
    ("2e1000", "20e999", True),
    ("2e1001", "20e1000", False),
], ids=lambda v: v if isinstance(v, bool) or len(v) < 20 else f"{v[:8]}...({len(v)} chars)")
def test_gsm8k_numbers_are_bounded(pred, gold, equal):
    assert gsm8k_equal(pred, gold) is equal


@pytest.mark.parametrize("pred, gold", [
    ("{" * 1000 + "1" + "}" * 1000, "1"),                              # was RecursionError
    (r"\sqrt{" * 1000 + "2" + "}" * 1000, r"\sqrt{2}"),                # was RecursionError
    (r"\frac{" * 1000 + "1}{2}" * 1000, "1"),
    ("(1," * 1000 + "1" + ")" * 1000, "(1,(1,2))"),
    ("(" * 1000 + "x" + ")" * 1000, "x"),
    ("[1,2]" + r"\cup[1,2]" * 500, "[1,2]"),
    (r"\begin{pmatrix}" * 300 + "1" + r"\end{pmatrix}" * 300, r"\begin{pmatrix}1\end{pmatrix}"),
    ("5" + " cm" * 20000, "5"),                                         # past MAX_ANSWER_CHARS: not parsed
], ids=["braces", "sqrt", "frac", "tuples", "parens", "cups", "matrices", "units"])
def test_math_deep_or_long_answers_are_refused_not_crashed(pred, gold):
    t = time.monotonic()
    assert math_equal(pred, gold) is False
    assert math_equal(gold, pred) is False
    assert time.monotonic() - t < 10
    math_normalize(pred)                                                # no RecursionError, no hour either
    assert time.monotonic() - t < 10


def test_math_nesting_below_the_limit_still_compares():
    deep = r"\sqrt{" * 20 + "2" + "}" * 20                               # 20 levels: far past any gold (3)
    assert math_equal(deep, deep.replace("2", r"\frac{4}{2}"))
    assert math_equal("(1," * 30 + "2" + ")" * 30, "(1," * 30 + "2.0" + ")" * 30)


@pytest.mark.parametrize("text, expected", [
    ("#### \u221217", "-17"),                                          # U+2212 MINUS SIGN: was 17
    ("#### \ufe6317", "-17"),                                          # U+FE63 SMALL HYPHEN-MINUS
    ("#### \uff0d17", "-17"),                                          # U+FF0D FULLWIDTH HYPHEN-MINUS
    ("#### \u201217", "-17"),                                          # U+2012 FIGURE DASH
    ("#### \u201317", "-17"),                                          # U+2013 EN DASH used as minus
    ("The answer is \u22123.5.", "-3.5"),
    ("It fell to \u22125 degrees.", "-5"),
    ("#### \u2212$1,234", "-1234"),
    ("x = 2 - \u22123", "-3"),                                         # a minus after an operator
])
def test_gsm8k_minus_signs(text, expected):
    assert gsm8k_extract(text) == expected
    assert gsm8k_equal(gsm8k_extract(text), expected)


@pytest.mark.parametrize("text, expected", [
    ("It takes 3-5 days", "5"),                                         # a range: was -5
    ("It takes 3\u20135 days", "5"),                                    # en dash range
    ("It takes 3 \u2013 5 days", "5"),
    ("so 8 \u2212 5", "5"),                                             # subtraction, not -5
    ("(2+3) - 5", "5"),
    ("pages 10\u201212", "12"),
    ("it dropped \u20145", "5"),                                        # U+2014 EM DASH is no minus
])
def test_gsm8k_a_dash_after_a_number_is_no_sign(text, expected):
    assert gsm8k_extract(text) == expected


def test_gsm8k_equal_reads_minus_signs():
    assert gsm8k_equal("\u221217", "-17") and gsm8k_equal("\uff0d17.0", "-17")
    assert not gsm8k_equal("\u221217", "17")


def test_math_minus_signs():
    assert math_equal("\u22123", "-3")
    assert math_equal("\\frac{\u22121}{2}", "-0.5")
    assert math_equal("(\u22121, \ufe632)", "(-1,-2)")
    assert not math_equal("\u22123", "3")


@pytest.mark.parametrize("pred, gold", [
    ("10, 4, -2", "4, 10, -2"),
    ("2, -3", "-3, 2"),
    (r"\{1, 2\}", r"\{2, 1\}"),
    (r"-\frac{1}{2}, 1", "1, -0.5"),
])
def test_math_lists_unordered_only_as_an_option(pred, gold):
    assert not math_equal(pred, gold)
    assert math_equal(pred, gold, unordered=True)


def test_math_unordered_keeps_multiplicity_and_tuples():
    assert not math_equal("2, 2, 3", "2, 3, 3", unordered=True)
    assert not math_equal("(2, 1)", "(1, 2)", unordered=True)          # tuples stay ordered


def test_score_answers_guards_each_example():
    """An exception while scoring one example is that example's error (verdict False), in the child
    and in-process alike; the others are scored as usual."""
    from soka.scorers import score_answers
    completions = ["#### \u221217", "#### 3", "#### 18"]
    golds = ["-17", 3, "18"]                               # a malformed gold: int, not str
    for limit in (60.0, None):
        rows = score_answers("gsm8k", completions, golds, time_limit=limit)
        assert [r[:2] for r in rows] == [("-17", True), ("3", False), ("18", True)]
        assert rows[0][2] is None and rows[2][2] is None
        assert rows[1][2].startswith("AttributeError: ")
    assert score_answers("math", [], []) == []


def _live_in_group(pgid):
    """Pids of live (not zombie) processes in process group `pgid`, from /proc."""
    live = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state not in "ZX":
                live.append(int(d))
    return live


def test_score_answers_time_limit_kills_the_child_and_its_sympy_worker():
    from soka.scorers import _AnswerScorer
    scorer = _AnswerScorer()
    try:
        assert scorer.score("math", r"\boxed{\sqrt8}", r"2\sqrt{2}", {}, 120.0) == (r"\sqrt8", True, None)
        pgid = scorer.proc.pid                                          # the child and its sympy worker
        t = time.monotonic()
        x, verdict, error = scorer.score("math", r"\boxed{10^{10^{10}}}", "5", {"timeout": 600}, 2.0)
        assert time.monotonic() - t < 2.0 + 10
        assert (x, verdict) == ("10^{10^{10}}", False) and error.startswith("TimeoutError: ")
        if os.path.isdir("/proc"):
            deadline = time.monotonic() + 10
            while _live_in_group(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _live_in_group(pgid) == []
        assert scorer.score("math", r"\boxed{5}", "5.0", {}, 120.0) == ("5", True, None)  # a fresh child
    finally:
        scorer.close()


def test_score_answers_a_dead_child_is_that_examples_error():
    """The scoring child dies mid-example (here: killed): that example is wrong with the reason,
    the rest of its process group goes too, and a fresh child scores the next example."""
    import signal
    from soka.scorers import _AnswerScorer
    scorer = _AnswerScorer()
    try:
        assert scorer.score("gsm8k", "#### 1", "1", {}, 60.0) == ("1", True, None)
        pgid = scorer.proc.pid
        timer = threading.Timer(1.0, os.kill, (pgid, signal.SIGKILL))
        timer.start()
        x, verdict, error = scorer.score("math", r"\boxed{10^{10^{10}}}", "5", {"timeout": 600}, 60.0)
        timer.join()
        assert (x, verdict) == ("10^{10^{10}}", False) and error.startswith("ChildProcessError: ")
        if os.path.isdir("/proc"):
            deadline = time.monotonic() + 10
            while _live_in_group(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _live_in_group(pgid) == []                          # its sympy worker went too
        assert scorer.score("gsm8k", "#### 2", "2", {}, 60.0) == ("2", True, None)
    finally:
        scorer.close()


def test_every_gsm8k_gold_scores_against_itself(gsm8k_rows):
    """GSM8K test golds, as completions, score True against themselves with no error, through the
    child that evaluate() uses."""
    from soka.scorers import score_answers
    golds = [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in gsm8k_rows["test"]]
    rows = score_answers("gsm8k", [f"#### {g}" for g in golds], golds)
    assert len(rows) == 1319 and all(v and e is None for _, v, e in rows), [r for r in rows if not r[1]][:5]


def test_every_math_gold_scores_against_itself(data):
    """MATH test + MATH-500 golds, likewise."""
    from soka.scorers import score_answers
    golds = [r["answer"] for r in _jsonl(data / "math" / "math500.jsonl")]
    golds += [math_last_boxed(r["solution"]) for r in _jsonl(data / "math" / "test.jsonl")]
    rows = score_answers("math", [f"so $\\boxed{{{g}}}$." for g in golds], golds)
    assert all(v and e is None for _, v, e in rows), [r for r in rows if not r[1]][:5]


@pytest.mark.parametrize("text, expected", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nThis works.", "def f():\n    return 1\n"),
    ("```\nx = 1\n```", "x = 1\n"),
    ("```py\nx = 2\n```\n```python\nx = 3\n```", "x = 2\n"),       # the first block
    ("```python\ndef g(): pass", "def g(): pass"),                  # unclosed fence
    ("def h(): pass\n[DONE] trailing", "def h(): pass\n"),
    ("def k(): pass", "def k(): pass"),
    ("1. Define it:\n   ```python\n   def f(x):\n       return x\n   ```\n", "def f(x):\n    return x\n"),  # in a list item
    ("```python\r\nx = 4\r\n```", "x = 4\r\n"),                   # CRLF lines
])
def test_mbpp_extract_code(text, expected):
    assert mbpp_extract_code(text) == expected
