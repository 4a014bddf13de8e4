"""Answer extraction and comparison for GSM8K, MATH and MBPP completions.

    gsm8k_extract("so she pays $1,234.") == "1234"     gsm8k_equal("29.00", "29") is True
    math_last_boxed(r"is $\\boxed{\\frac{1}{2}}$.") == r"\\frac{1}{2}"
    math_equal("0.5", r"\\dfrac12") is True             math_normalize(r"5\\text{ cm}") == "5"
    mbpp_extract_code("```python\\ndef f(): pass\\n```") == "def f(): pass\\n"

MATH comparison runs in three steps, cheapest first: normalized strings equal; both sides exact
rationals (Fraction) and equal; otherwise sympy decides, in a long-lived child process with a
deadline per comparison, because a symbolic call can hang and `signal.alarm` works only in the main
thread. Lists and sets compare in order, as the reference graders do (`unordered=True` reads them in
any order). The rules, and where they differ from lm-evaluation-harness, Hendrycks, Minerva and
PRM800K, are in docs/tasks.md.

Model output is hostile input: numbers are parsed only within bounds (MAX_DIGITS, MAX_EXPONENT),
LaTeX only to MAX_DEPTH nested groups, MATH answers only up to MAX_ANSWER_CHARS; past a bound an
answer matches only an identical string. `score_answers` scores a whole run, each example in a
child process under a time limit, and records a failure as that example's error, never raising.
"""
import atexit
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from fractions import Fraction

# ------------------------------------------------------------------------------------ numbers

# Bounds no GSM8K or MATH answer comes near (the longest digit run in any gold is 9 digits, and no
# gold uses e-notation), so a hostile answer cannot make an exact number cost time or memory: a
# number with more digits, or a larger e-exponent, is not read as a number (only an identical string
# matches it). 10**1000 is instant; Fraction("1e999999999") runs for hours and int() refuses more
# than 4,300 digits.
MAX_DIGITS = 1000       # digits of one number, integer and decimal part together
MAX_EXPONENT = 1000     # |n| of an e-exponent: 1e1000 is read, 1e1001 is not

# Minus signs: "-", U+2212 MINUS SIGN, U+FE63 SMALL HYPHEN-MINUS, U+FF0D FULLWIDTH HYPHEN-MINUS,
# and the dashes models write for a minus, U+2012 FIGURE DASH and U+2013 EN DASH (not U+2014 EM
# DASH, a punctuation dash).
_MINUS = "-\u2212\ufe63\uff0d\u2012\u2013"
_TO_HYPHEN = str.maketrans({c: "-" for c in _MINUS[1:]})


class _Huge:
    """What _decimal returns for a number past MAX_DIGITS or MAX_EXPONENT."""

    def __repr__(self):
        return "HUGE"


_HUGE = _Huge()
_DECIMAL = re.compile(r"([-+]?)(\d*)(?:\.(\d*))?(?:[eE]([-+]?)(\d+))?")


def _decimal(s):
    """Exact Fraction of "-12", "3.50", ".5", "2.", "1e-3"; None if `s` is no such number; _HUGE if
    it has more than MAX_DIGITS digits or an exponent beyond +-MAX_EXPONENT."""
    m = _DECIMAL.fullmatch(s)
    if not m or not (m.group(2) or m.group(3)):
        return None
    sign, whole, frac, esign, exp = m.groups()
    frac = frac or ""
    exp = (exp or "0").lstrip("0") or "0"
    if len(whole) + len(frac) > MAX_DIGITS or len(exp) > 5 or int(exp) > MAX_EXPONENT:
        return _HUGE
    value = Fraction(int(whole + frac or "0"), 10 ** len(frac))
    value *= Fraction(10) ** (-int(exp) if esign == "-" else int(exp))
    return -value if sign == "-" else value


# ----------------------------------------------------------------------------------------- GSM8K

# A number as people write it: "-12", "1,234.5", "$7", ".5", "−17" (any sign of _MINUS). Thousands
# groups must be exact, so a list "3,4,5" reads as three numbers, not 345, and "1,2345" as 1 and
# 2345, not 1234 and 5. A trailing period is never part of it.
_NUM = r"([" + _MINUS + r"]?)\$?((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"


def _plain(text, m):
    """The plain numeric string of a _NUM match. Its sign counts only where it stands before the
    number and not after another one: after a digit, ")" or "]" (spaces between allowed) it is an
    operator or a range dash, so "3–5", "8 - 5" and "(2+3) − 5" end in 5, not -5."""
    sign, digits = m.group(1), m.group(2).replace(",", "")
    i = m.start(1)
    while i > 0 and text[i - 1] in " \t":
        i -= 1
    if sign and i > 0 and (text[i - 1].isdigit() or text[i - 1] in ")]"):
        sign = ""
    return ("-" if sign else "") + ("0" + digits if digits.startswith(".") else digits)


def gsm8k_extract(text):
    """The final answer as a plain numeric string, or None.

    Order: the first "#### N" (GSM8K's own answer line), else the first "The answer is N", else
    the last number in the text. "$" and thousands commas are dropped: "$1,234." -> "1234"; a
    minus sign of any kind (U+2212 ...) becomes "-" unless it follows a number ("3–5" -> "5").
    LaTeX's thousands separator reads as a comma: "$1{,}296$" -> "1296".
    """
    text = text.replace("{,}", ",")
    for pattern in (r"####\s*" + _NUM, r"[Tt]he (?:final )?answer is[\s:*]*" + _NUM):
        m = re.search(pattern, text)
        if m:
            return _plain(text, m)
    last = None
    for last in re.finditer(_NUM, text):
        pass
    return _plain(text, last) if last else None


def _fraction(s):
    """Exact value of a GSM8K answer ("1,234", "$5", "−3.5", "3/4"); None past the bounds."""
    s = s.replace(",", "").replace("$", "").strip().translate(_TO_HYPHEN)
    m = re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", s)
    if m:
        num, den = _decimal(m.group(1)), _decimal(m.group(2))
        return None if num is _HUGE or den is _HUGE or den == 0 else num / den
    value = _decimal(s)
    return None if value is _HUGE else value


def gsm8k_equal(pred, gold):
    """Numeric equality of two answer strings ("29.00" == "29"); None never matches. Strings that
    are no number within the bounds compare as stripped strings."""
    if pred is None or gold is None:
        return False
    a, b = _fraction(pred), _fraction(gold)
    return a == b if a is not None and b is not None else pred.strip() == gold.strip()


# ------------------------------------------------------------------------------------------ MATH

# The recursive steps (normalizing \frac and \sqrt, the LaTeX -> sympy converter, comparing nested
# tuples) go at most MAX_DEPTH groups deep (MATH golds nest at most 3), so 1,000 nested braces give
# "not equal", not a RecursionError. An answer longer than MAX_ANSWER_CHARS (the longest MATH gold
# has 159 characters) is not normalized at all: it matches only the identical string.
MAX_DEPTH = 100
MAX_ANSWER_CHARS = 1000


def _group(s, i):
    """(contents, end) of the brace group that opens at s[i] == "{", or (None, i) if unbalanced."""
    depth = 0
    for k in range(i, len(s)):
        if s[k] == "{":
            depth += 1
        elif s[k] == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1:k], k + 1
    return None, i


def math_last_boxed(text):
    r"""Contents of the last \boxed{...} or \fbox{...} (nested braces kept), or None.

    `\boxed 5` (no braces) gives the next whitespace- or $-delimited token, "5".
    """
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (len("\\boxed") if text.startswith("\\boxed", i) else len("\\fbox"))
    k = j
    while k < len(text) and text[k] in " \t":
        k += 1
    if k < len(text) and text[k] == "{":
        return _group(text, k)[0]
    if k > j:  # "\boxed 5"
        m = re.match(r"[^\s$]+", text[k:])
        return m.group(0).rstrip(".") if m else None
    return None


def _arg(s, i):
    """One LaTeX argument at s[i:] -> (text, end): a {group}, a \\command, or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None, i
    if s[i] == "{":
        return _group(s, i)
    if s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
    return s[i], i + 1


def _braces(s, depth=0):
    r"""Canonical \frac{a}{b} and \sqrt{a}, \sqrt[n]{a}: \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}.
    Below MAX_DEPTH nested arguments the text is left as it is."""
    if depth > MAX_DEPTH:
        return s
    out, i = [], 0
    while i < len(s):
        m = re.match(r"\\(frac|sqrt)(?![A-Za-z])", s[i:])
        if not m:
            out.append(s[i])
            i += 1
            continue
        i += m.end()
        if m.group(1) == "frac":
            num, i = _arg(s, i)
            den, i = _arg(s, i)
            if num is None or den is None:
                return s  # malformed; leave it to string comparison
            out.append("\\frac{" + _braces(num, depth + 1) + "}{" + _braces(den, depth + 1) + "}")
        else:
            index = ""
            if i < len(s) and s[i] == "[":
                close = s.find("]", i)
                if close < 0:
                    return s
                index, i = "[" + s[i + 1:close] + "]", close + 1
            rad, i = _arg(s, i)
            if rad is None:
                return s
            out.append("\\sqrt" + index + "{" + _braces(rad, depth + 1) + "}")
    return "".join(out)


# Words dropped after a number ("5 cm", "18 ways"): units and the nouns MATH answers count.
_UNIT_WORDS = (
    "square units units unit sq cm mm km meters meter metres metre inches inch ft feet foot yards "
    "yard miles mile mph degrees degree cents cent dollars dollar hours hour minutes minute seconds "
    "second days day weeks week years year pounds pound ounces ounce grams gram kg lbs lb ways "
    "integers points digits edges students people children tickets teachers meals multiples "
    "handshakes games outfits times a.m. p.m."
).split()
# A unit is a \text{words} group after anything, or a known word not glued to letters before it
# ("5 cm", "5cm"; not the "day" of "Monday").
_UNIT = r"(?:\\(?:text|mbox|textrm|mathrm|textnormal)\s*\{\s*[A-Za-z][A-Za-z .]*\}|(?<![A-Za-z\\])(?:" + \
        "|".join(re.escape(w) for w in sorted(_UNIT_WORDS, key=len, reverse=True)) + r"))"


def math_normalize(s):
    r"""The Hendrycks steps (their `strip_string`), plus unit words, \text{}, thousands commas.

    Spaces, \left, \right, \! and `$` go; tfrac/dfrac become frac; degrees (^\circ), \% and a
    trailing unit (`\text{ cm}^2`, `inches`) go when something precedes them; \text{X} becomes X;
    `x = 5` becomes 5 when the left side is at most two characters; \frac12 -> \frac{1}{2},
    \sqrt2 -> \sqrt{2}; `a/b` of integers -> \frac{a}{b}; `1,000` and `1{,}000` -> 1000; `.5` -> 0.5;
    `(C)` -> C; a trailing period goes; every minus sign of _MINUS (U+2212 ...) becomes "-". Unlike
    Hendrycks, `\\` (a row break) stays `\\`. Text longer than MAX_ANSWER_CHARS is only stripped
    (some steps take time quadratic in the length).
    """
    if len(s) > MAX_ANSWER_CHARS:
        return s.strip()
    s = s.strip().replace("\n", " ").replace("\\!", "").replace("{,}", ",").translate(_TO_HYPHEN)
    s = re.sub(r"(?<!\\)\\[,;: ]", " ", s)  # thin spaces; not the row break "\\\\ "
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("cfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\text\s*\{\s*and\s*\}", ",", s)
    # A trailing unit, possibly squared, when a value precedes it.
    while True:
        m = re.fullmatch(r"(.*?[\w})\]])\s*" + _UNIT + r"\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*\.?\s*", s)
        if not m:
            break
        s = m.group(1)
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|textnormal)\s*\{([^{}]*)\}", r"\1", s)
    s = s.strip()
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:  # "x = 5" -> "5" (Hendrycks)
        s = s.split("=")[1]
    s = s.replace(" ", "")
    s = _braces(s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = "\\frac{%s}{%s}" % m.groups()
    s = s.rstrip(".")
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)
    return m.group(1).upper() if m else s


def _number(s):
    r"""An exact Fraction for "-3", "2.50", "1e-3", "\frac{-1}{2}", "-\frac{3}{4}", and the mixed
    number "3\frac{1}{2}" = 7/2 (as MATH writes one, not 3 · 1/2); _HUGE past the bounds
    (MAX_DIGITS, MAX_EXPONENT); None otherwise."""
    m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        whole, num, den = (_decimal(g) for g in m.group(2, 3, 4))
        if any(v is _HUGE for v in (whole, num, den)):
            return _HUGE
        return None if den == 0 else (-1 if m.group(1) else 1) * (whole + num / den)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m:
        num, den = _decimal(m.group(2)), _decimal(m.group(3))
        if num is _HUGE or den is _HUGE:
            return _HUGE
        return None if den == 0 else (-1 if m.group(1) else 1) * num / den
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(e-?\d+)?", s):
        return _decimal(s)
    return None


def _split_top(s, sep=","):
    """Split at `sep` outside brackets of any kind."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _matrix(s):
    r"""Rows of cells of a \begin{pmatrix} ... \end{pmatrix} (or bmatrix, matrix); None otherwise."""
    m = re.fullmatch(r"\\begin\{([pbv]?matrix)\}(.*)\\end\{\1\}", s)
    if not m:
        return None
    body = re.sub(r"(\\\\)+$", "", m.group(2))  # a trailing row break ends no row
    return [row.split("&") for row in body.split("\\\\")]


def _structure(s):
    """(open, items, close) for a tuple, interval, set or bare list; None for a single value."""
    o, c, inner = "", "", s
    if s.startswith("\\{") and s.endswith("\\}"):
        o, c, inner = "{", "}", s[2:-2]
    elif len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}" and _group_closes_at_end(s):
        o, c, inner = s[0], s[-1], s[1:-1]
    items = _split_top(inner)
    return (o, items, c) if len(items) > 1 else None


def _group_closes_at_end(s):
    depth = 0
    for k, ch in enumerate(s):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and k < len(s) - 1:
            return False
    return True


def _nesting(s):
    """How deep brackets of any kind nest in `s`."""
    depth = deepest = 0
    for c in s:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    return deepest


def math_equal(pred, gold, *, timeout=5.0, unordered=False):
    r"""MATH answer equivalence after `math_normalize`; None never matches.

    Words ("Evelyn", "odd") compare without case. Tuples, intervals, sets (\{...\}) and bare lists
    ("2, -3") compare element by element, in order, with the same brackets, as Hendrycks, lm-eval
    and PRM800K compare them (`unordered=True`: sets and bare lists in any order); unions (\cup) and
    matrices part by part. Single values: equal strings, else equal exact rationals ("0.5" vs
    "\frac{1}{2}"), else sympy with `timeout` seconds per comparison. An answer longer than
    MAX_ANSWER_CHARS matches only the identical string.
    """
    if pred is None or gold is None:
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return pred.strip() == gold.strip()
    p, g = math_normalize(pred), math_normalize(gold)
    return _equal(p, g, timeout, unordered)


def _equal(p, g, timeout, unordered, depth=0):
    if p == g:
        return True
    if not p or not g or depth > MAX_DEPTH:
        return False
    if re.fullmatch(r"[A-Za-z]+", p) and re.fullmatch(r"[A-Za-z]+", g):  # words: "Evelyn", "odd"
        return p.lower() == g.lower()

    def eq(a, b):
        return _equal(a, b, timeout, unordered, depth + 1)

    pm, gm = _matrix(p), _matrix(g)
    if pm or gm:
        return (pm is not None and gm is not None and len(pm) == len(gm)
                and all(len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))
                        for a, b in zip(pm, gm)))
    pu, gu = _split_top(p, "\\cup"), _split_top(g, "\\cup")
    if len(pu) > 1 or len(gu) > 1:
        return len(pu) == len(gu) and all(eq(a, b) for a, b in zip(pu, gu))
    ps, gs = _structure(p), _structure(g)
    if ps or gs:
        if not (ps and gs) or len(ps[1]) != len(gs[1]):
            return False
        (po, pitems, pc), (go, gitems, gc) = ps, gs
        if (po, pc) != (go, gc):
            return False
        if unordered and po in ("", "{"):  # the option: bare lists and sets in any order
            left = list(gitems)
            for a in pitems:
                hit = next((b for b in left if eq(a, b)), None)
                if hit is None:
                    return False
                left.remove(hit)
            return True
        return all(eq(a, b) for a, b in zip(pitems, gitems))
    a, b = _number(p), _number(g)
    if a is _HUGE or b is _HUGE:  # past the bounds: only equal strings (handled above) match
        return False
    if a is not None and b is not None:
        return a == b
    if ("=" in p) != ("=" in g):
        return False
    sa, sb = _sympy_text(p), _sympy_text(g)
    if sa is None or sb is None:
        return False
    if "=" in p:  # equations: lhs - rhs equal up to sign
        return _worker.equal(sa, sb, timeout) or _worker.equal(sa, f"-({sb})", timeout)
    return _worker.equal(sa, sb, timeout)


# LaTeX -> sympy input. Only these names survive; any other run of letters becomes single-letter
# symbols ("xy" -> x*y), so the text handed to sympy's parser (which calls eval) has no Python names.
_NAMES = {"sqrt", "sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "log",
          "ln", "exp", "pi", "infty", "theta", "alpha", "beta", "phi", "omega", "lambda", "mu"}
_RENAME = {"arcsin": "asin", "arccos": "acos", "arctan": "atan", "ln": "log", "infty": "oo",
           "lambda": "lamda", "cdot": "*", "times": "*", "div": "/"}


def _sympy_text(s):
    r"""Normalized LaTeX -> a sympy-parsable string, or None if it holds anything else."""
    if s.count("=") > 1 or _nesting(s) > MAX_DEPTH:
        return None
    if "=" in s:  # an equation compares as lhs - rhs
        lhs, rhs = s.split("=")
        s = "{" + lhs + "}-{" + rhs + "}"
    try:
        return _tex(s) or None
    except ValueError:
        return None


def _tex(s, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    out, i = [], 0
    while i < len(s):
        c = s[i]
        m = re.match(r"\\?([A-Za-z]+)|(\d+\.?\d*|\.\d+)", s[i:])
        if s.startswith("\\frac", i) or s.startswith("\\sqrt", i):
            frac = s.startswith("\\frac", i)
            i += 5
            index = None
            if not frac and s.startswith("[", i):
                close = s.find("]", i)
                if close < 0:
                    raise ValueError(s)
                index, i = s[i + 1:close], close + 1
            a, i = _arg(s, i)
            b, i = _arg(s, i) if frac else (None, i)
            if a is None or (frac and b is None):
                raise ValueError(s)
            if frac:
                out.append(f"(({_tex(a, depth + 1)})/({_tex(b, depth + 1)}))")
            elif index is None:
                out.append(f"sqrt({_tex(a, depth + 1)})")
            else:
                out.append(f"(({_tex(a, depth + 1)})**(1/({_tex(index, depth + 1)})))")
            continue
        if c == "{":
            inner, j = _group(s, i)
            if inner is None:
                raise ValueError(s)
            out.append("(" + _tex(inner, depth + 1) + ")")
            i = j
        elif m and m.group(1):
            name = m.group(1)
            if name in _NAMES or name in _RENAME:
                out.append(_RENAME.get(name, name))
            elif c == "\\":
                raise ValueError(s)  # an unknown command: \begin, \pm, \in ...
            else:
                out.append("*".join(name))
            i += m.end()
        elif m:
            out.append(m.group(2))
            i += m.end()
        elif c == "^":
            out.append("**")
            i += 1
        elif c in "+-*/()!":
            out.append(c)
            i += 1
        elif c == " ":
            i += 1
        else:
            raise ValueError(s)
    return " ".join(out).replace(" !", "!")


# The sympy child. Parsing uses local names only: single letters are plain Symbols (so E, I, N,
# S, O, Q are not sympy's constants). A difference that is an exact rational decides exactly.
# Otherwise, without free symbols, both sides are evaluated to 30 digits and must agree to a
# relative 1e-20 (so a 12-digit decimal never equals sqrt(2)); with symbols,
# at four random rational points (a randomized identity test: a nonzero difference of these small
# expressions vanishing at all four is vanishingly unlikely). zoo or nan anywhere never matches.
_WORKER_SOURCE = r'''
import json, random, resource, sys
try:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
except (ValueError, OSError):
    pass
import sympy
from sympy.parsing.sympy_parser import (parse_expr, standard_transformations,
                                        implicit_multiplication_application)
T = standard_transformations + (implicit_multiplication_application,)
NAMES = {c: sympy.Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
NAMES.update({n: sympy.Symbol(n) for n in ("theta", "alpha", "beta", "phi", "omega", "lamda", "mu")})
NAMES.update(pi=sympy.pi, oo=sympy.oo, sqrt=sympy.sqrt, sin=sympy.sin, cos=sympy.cos,
             tan=sympy.tan, sec=sympy.sec, csc=sympy.csc, cot=sympy.cot, asin=sympy.asin,
             acos=sympy.acos, atan=sympy.atan, log=sympy.log, exp=sympy.exp)

def close(a, b, d):
    # sympy Floats, not Python floats: 2**2005 must not overflow to inf and "match" anything.
    try:
        v, scale = abs(sympy.N(d, 30)), sympy.Max(1, abs(sympy.N(a, 30)), abs(sympy.N(b, 30)))
        if not (v.is_finite and scale.is_finite):
            return None
        return bool(v <= sympy.Float("1e-20") * scale)
    except (TypeError, ValueError):
        return None

def same(a, b):
    A = parse_expr(a, local_dict=dict(NAMES), transformations=T)
    B = parse_expr(b, local_dict=dict(NAMES), transformations=T)
    if any(e.has(sympy.zoo, sympy.nan) for e in (A, B)):
        return False  # a division by zero is no answer
    if A == B:
        return True
    d = A - B
    if d.is_Rational:
        return d == 0  # exact: 2**100 - 1 is not 2**100, however close in relative terms
    syms = sorted(d.free_symbols, key=str)
    if not syms:
        return bool(close(A, B, d))
    rng, verdicts = random.Random(0), []
    for _ in range(4):
        point = {s: sympy.Rational(rng.randint(1, 97), rng.randint(1, 89)) for s in syms}
        verdicts.append(close(A.subs(point), B.subs(point), d.subs(point)))
    known = [v for v in verdicts if v is not None]
    return bool(known) and all(known)

print("ready", flush=True)
for line in sys.stdin:
    a, b = json.loads(line)
    try:
        ok = same(a, b)
    except Exception:
        ok = False
    print(1 if ok else 0, flush=True)
'''


class _Child:
    """A long-lived `python -c SOURCE ARGS...` child that answers JSON lines; started on first use.

    Its first line is "ready". A reply past its deadline (or a child that died) kills it, and the
    next request starts a fresh one. With `own_group=True` it runs in a process group of its own, and
    killing it ends the whole group (the child's own children go with it). Works from any thread
    (one request at a time, under `lock`) and restarts after a fork.
    """

    def __init__(self, source, args=(), *, own_group=False, what="a child"):
        self.source, self.args, self.own_group, self.what = source, list(args), own_group, what
        self.proc, self.pid, self.buf = None, None, b""
        self.lock = threading.Lock()

    def _ensure(self):
        if self.proc is None or self.proc.poll() is not None or self.pid != os.getpid():
            self.close()  # a dead child's pipes (after a fork: nothing; that child is the parent's)
            self._start()

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", self.source, *self.args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=self.own_group)
        self.pid, self.buf = os.getpid(), b""
        atexit.register(self.close)
        if self._readline(120.0) != b"ready":
            self.close()
            raise RuntimeError(f"soka/scorers.py: {self.what} did not start")

    def _send(self, obj):
        """Write one JSON line; False if the child is gone."""
        try:
            self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def _readline(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.strip()

    def close(self):
        if self.proc is not None and self.pid == os.getpid():
            if self.own_group:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            atexit.unregister(self.close)
        self.proc = None


class _SympyWorker(_Child):
    """The sympy child; a comparison past its deadline kills it (False)."""

    def __init__(self):
        super().__init__(_WORKER_SOURCE, what="the sympy worker (is sympy installed?)")

    def equal(self, a, b, timeout):
        with self.lock:
            self._ensure()
            if not self._send([a, b]):
                self.close()
                return False
            line = self._readline(timeout)
            if line is None:  # past the deadline (or the child died): kill it, start afresh next time
                self.close()
                return False
            return line == b"1"


_worker = _SympyWorker()


# ------------------------------------------------------------------------- scoring a whole run

def _reason(e):
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:297] + "..."


def _score_steps(task, completion, gold, options):
    """Yield the extracted answer, then (verdict, error); an exception is the error (verdict False)."""
    extract, equal = {"gsm8k": (gsm8k_extract, gsm8k_equal), "math": (math_last_boxed, math_equal)}[task]
    try:
        x = extract(completion)
    except Exception as e:
        yield None
        yield False, _reason(e)
        return
    yield x
    try:
        verdict = bool(equal(x, gold, **options))
    except Exception as e:
        yield False, _reason(e)
        return
    yield verdict, None


# The scoring child: this file loaded by path (importing the soka package would import torch), one
# JSON request [task, completion, gold, options] per line, answered by two lines: the extracted
# answer, then [verdict, error].
_SCORER_SOURCE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("soka_scorers_child", sys.argv[1])
scorers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scorers)
print("ready", flush=True)
for line in sys.stdin:
    for reply in scorers._score_steps(*json.loads(line)):
        print(json.dumps(reply), flush=True)
"""


class _AnswerScorer(_Child):
    """The scoring child: one example at a time with a deadline; past it, or if the child dies, the
    child's process group (its sympy worker included) is killed and a fresh child scores the next."""

    def __init__(self):
        super().__init__(_SCORER_SOURCE, [os.path.abspath(__file__)], own_group=True,
                         what="the scoring child")

    def score(self, task, completion, gold, options, time_limit):
        with self.lock:
            self._ensure()
            deadline = time.monotonic() + time_limit
            replies = []
            if self._send([task, completion, gold, options]):
                while len(replies) < 2:
                    line = self._readline(max(0.0, deadline - time.monotonic()))
                    try:
                        replies.append(json.loads(line))
                    except (TypeError, ValueError):  # None (no line) or not a reply
                        break
            if len(replies) == 2:
                return replies[0], replies[1][0], replies[1][1]
            status = self.proc.poll()
            self.close()
            if status is None and time.monotonic() >= deadline:
                reason = f"TimeoutError: not scored within {time_limit:g} s (time_limit)"
            else:
                reason = f"ChildProcessError: the scoring process failed (exit status {status})"
            return (replies[0] if replies else None), False, reason


def score_answers(task, completions, golds, *, time_limit=60.0, options=None):
    """[(extracted, verdict, error)] for "gsm8k" or "math" completions against their golds.

    Extraction and comparison of each example run in a child process (started once, restarted
    after a failure) under `time_limit` seconds; an exception, a timeout or a dead child is that
    example's error (a string such as "RecursionError: ...", else None) with verdict False, and the
    other examples are scored as usual. MATH's sympy step keeps its own per-comparison deadline
    (math_equal's timeout, 5 s) inside the child. `options` go to math_equal (timeout, unordered).
    `time_limit=None` scores in this process, with the same exception guard but no time limit.
    """
    if task not in ("gsm8k", "math"):
        raise ValueError(f"soka/scorers.py: score_answers scores gsm8k or math, not {task!r}")
    options = dict(options or {})
    if task == "gsm8k" and options:
        raise ValueError("soka/scorers.py: options are math_equal's keywords; gsm8k has none")
    completions, golds = list(completions), list(golds)
    if len(completions) != len(golds):
        raise ValueError(f"soka/scorers.py: {len(completions)} completions, {len(golds)} golds")
    if time_limit is None:
        out = []
        for c, g in zip(completions, golds):
            steps = _score_steps(task, c, g, options)
            x = next(steps)
            out.append((x, *next(steps)))
        return out
    scorer = _AnswerScorer()
    try:
        return [scorer.score(task, c, g, options, time_limit) for c, g in zip(completions, golds)]
    finally:
        scorer.close()


# ------------------------------------------------------------------------------------------ MBPP

def mbpp_extract_code(text):
    """The program in a completion: the first ``` fenced block (closed or not; dedented, as a block
    inside a list item is indented with it), else the text up to "[DONE]" (the MBPP paper's end
    marker), else the whole text."""
    m = re.search(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n(.*?)(?:```|\Z)", text, re.S)
    if m:
        return textwrap.dedent(m.group(1))
    return text.split("[DONE]")[0]
