"""Answer extraction and comparison for GSM8K, MATH and MBPP completions.

    gsm8k_extract("so she pays $1,234.") == "1234"     gsm8k_equal("29.00", "29") is True
    math_last_boxed(r"is $\\boxed{\\frac{1}{2}}$.") == r"\\frac{1}{2}"
    math_equal("0.5", r"\\dfrac12") is True             math_normalize(r"5\\text{ cm}") == "5"
    mbpp_extract_code("```python\\ndef f(): pass\\n```") == "def f(): pass\\n"

MATH comparison runs in three steps, cheapest first: normalized strings equal; both sides exact
rationals (Fraction) and equal; otherwise sympy decides, in a long-lived child process with a
deadline per comparison, because a symbolic call can hang and `signal.alarm` works only in the main
thread. The rules, and where they differ from lm-evaluation-harness, Hendrycks, Minerva and PRM800K,
are in docs/tasks.md.
"""
import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

# ----------------------------------------------------------------------------------------- GSM8K

# A number as people write it: "-12", "1,234.5", "$7", ".5". Thousands groups must be exact, so a
# list "3,4,5" reads as three numbers, not 345. A trailing period is never part of it.
_NUM = r"(-?)\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"


def _plain(sign, digits):
    digits = digits.replace(",", "")
    return sign + ("0" + digits if digits.startswith(".") else digits)


def gsm8k_extract(text):
    """The final answer as a plain numeric string, or None.

    Order: the first "#### N" (GSM8K's own answer line), else the first "The answer is N", else
    the last number in the text. "$" and thousands commas are dropped: "$1,234." -> "1234".
    """
    for pattern in (r"####\s*" + _NUM, r"[Tt]he (?:final )?answer is[\s:*]*" + _NUM):
        m = re.search(pattern, text)
        if m:
            return _plain(*m.groups())
    found = re.findall(_NUM, text)
    return _plain(*found[-1]) if found else None


def _fraction(s):
    try:
        return Fraction(s.replace(",", "").replace("$", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_equal(pred, gold):
    """Numeric equality of two answer strings ("29.00" == "29"); None never matches."""
    if pred is None or gold is None:
        return False
    a, b = _fraction(pred), _fraction(gold)
    return a == b if a is not None and b is not None else pred.strip() == gold.strip()


# ------------------------------------------------------------------------------------------ MATH

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


def _braces(s):
    r"""Canonical \frac{a}{b} and \sqrt{a}, \sqrt[n]{a}: \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}."""
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
            out.append("\\frac{" + _braces(num) + "}{" + _braces(den) + "}")
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
            out.append("\\sqrt" + index + "{" + _braces(rad) + "}")
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
    \sqrt2 -> \sqrt{2}; `a/b` of integers -> \frac{a}{b}; `1,000` -> 1000; `.5` -> 0.5;
    `(C)` -> C; a trailing period goes. Unlike Hendrycks, `\\` (a row break) stays `\\`.
    """
    s = s.strip().replace("\n", " ").replace("\\!", "")
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
    r"""An exact Fraction for "-3", "2.50", "\frac{-1}{2}", "-\frac{3}{4}"; None otherwise."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m:
        den = Fraction(m.group(3))
        return None if den == 0 else (-1 if m.group(1) else 1) * Fraction(m.group(2)) / den
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(e-?\d+)?", s):
        return Fraction(s)
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


def math_equal(pred, gold, *, timeout=5.0):
    r"""MATH answer equivalence after `math_normalize`; None never matches.

    Words ("Evelyn", "odd") compare without case. Tuples and intervals compare element by element,
    with the same brackets; sets (\{...\}) and bare lists ("2, -3") in any order; unions (\cup)
    and matrices part by part. Single values: equal strings, else equal exact rationals ("0.5" vs
    "\frac{1}{2}"), else sympy with `timeout` seconds.
    """
    if pred is None or gold is None:
        return False
    p, g = math_normalize(pred), math_normalize(gold)
    return _equal(p, g, timeout)


def _equal(p, g, timeout):
    if p == g:
        return True
    if not p or not g:
        return False
    if re.fullmatch(r"[A-Za-z]+", p) and re.fullmatch(r"[A-Za-z]+", g):  # words: "Evelyn", "odd"
        return p.lower() == g.lower()
    pm, gm = _matrix(p), _matrix(g)
    if pm or gm:
        return (pm is not None and gm is not None and len(pm) == len(gm)
                and all(len(a) == len(b) and all(_equal(x, y, timeout) for x, y in zip(a, b))
                        for a, b in zip(pm, gm)))
    pu, gu = _split_top(p, "\\cup"), _split_top(g, "\\cup")
    if len(pu) > 1 or len(gu) > 1:
        return len(pu) == len(gu) and all(_equal(a, b, timeout) for a, b in zip(pu, gu))
    ps, gs = _structure(p), _structure(g)
    if ps or gs:
        if not (ps and gs) or len(ps[1]) != len(gs[1]):
            return False
        (po, pitems, pc), (go, gitems, gc) = ps, gs
        if (po, pc) != (go, gc):
            return False
        if po in ("", "{"):  # bare lists and sets: any order
            left = list(gitems)
            for a in pitems:
                hit = next((b for b in left if _equal(a, b, timeout)), None)
                if hit is None:
                    return False
                left.remove(hit)
            return True
        return all(_equal(a, b, timeout) for a, b in zip(pitems, gitems))
    a, b = _number(p), _number(g)
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
    if s.count("=") > 1:
        return None
    if "=" in s:  # an equation compares as lhs - rhs
        lhs, rhs = s.split("=")
        s = "{" + lhs + "}-{" + rhs + "}"
    try:
        return _tex(s) or None
    except ValueError:
        return None


def _tex(s):
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
                out.append(f"(({_tex(a)})/({_tex(b)}))")
            elif index is None:
                out.append(f"sqrt({_tex(a)})")
            else:
                out.append(f"(({_tex(a)})**(1/({_tex(index)})))")
            continue
        if c == "{":
            inner, j = _group(s, i)
            if inner is None:
                raise ValueError(s)
            out.append("(" + _tex(inner) + ")")
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
# S, O, Q are not sympy's constants). Without free symbols, both sides are evaluated to 30 digits
# and must agree to a relative 1e-20 (so a 12-digit decimal never equals sqrt(2)); with symbols,
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


class _SympyWorker:
    """A long-lived `python -c` child running sympy; a comparison past its deadline kills it.

    Works from any thread (one comparison at a time, under a lock) and restarts after a fork.
    """

    def __init__(self):
        self.proc, self.pid, self.buf = None, None, b""
        self.lock = threading.Lock()
        atexit.register(self.close)

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_SOURCE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.pid, self.buf = os.getpid(), b""
        if self._readline(120.0) != b"ready":
            self.close()
            raise RuntimeError("soka/scorers.py: the sympy worker did not start (is sympy installed?)")

    def _readline(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.strip()

    def equal(self, a, b, timeout):
        with self.lock:
            if self.proc is None or self.proc.poll() is not None or self.pid != os.getpid():
                self._start()
            try:
                self.proc.stdin.write(json.dumps([a, b]).encode() + b"\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                self.close()
                return False
            line = self._readline(timeout)
            if line is None:  # past the deadline (or the child died): kill it, start afresh next time
                self.close()
                return False
            return line == b"1"

    def close(self):
        if self.proc is not None and self.pid == os.getpid():
            self.proc.kill()
            self.proc.wait()
        self.proc = None


_worker = _SympyWorker()


# ------------------------------------------------------------------------------------------ MBPP

def mbpp_extract_code(text):
    """The program in a completion: the first ``` fenced block (closed or not), else the text up
    to "[DONE]" (the MBPP paper's end marker), else the whole text."""
    m = re.search(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", text, re.S)
    if m:
        return m.group(1)
    return text.split("[DONE]")[0]
