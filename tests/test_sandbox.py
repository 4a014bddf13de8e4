"""The MBPP sandbox: verdicts, limits, isolation, and MBPP's own reference solutions.

The hostile cases run together through run_many, so the suite pays for the slowest few only.
"""
import ast
import json
import os
import time
from pathlib import Path

import pytest

from soka import mbpp_run
from soka.sandbox import OUTPUT_LIMIT, landlock_abi, run_many, run_program

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TIMEOUT = 3.0
GOOD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def test_public_name_correct_and_wrong():
    assert mbpp_run(GOOD, TESTS) is True
    assert mbpp_run("def add(a, b):\n    return a - b\n", TESTS) is False
    assert mbpp_run(GOOD, TESTS + ["assert add(2, 2) == 5"]) is False      # the last assert counts
    assert mbpp_run("", ["assert True"]) is True
    assert mbpp_run("import math\n", ["assert fsum([0.5, 0.5]) == 1"], "from math import fsum") is True


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A file and a folder outside every sandbox, which no program may change."""
    d = tmp_path_factory.mktemp("outside")
    (d / "keep.txt").write_text("precious")
    return d


# name -> (program, expected status). Each hostile program defines a correct `add` too, so a pass
# could only come from the sandbox failing to stop it.
def _cases(outside):
    keep = str(outside / "keep.txt")
    return {
        "syntax error": ("def add(a, b)\n    return a + b\n", "failed"),
        "infinite loop": ("while True:\n    pass\n" + GOOD, "timeout"),
        "sleep": ("import time\ntime.sleep(60)\n" + GOOD, "timeout"),
        "deep recursion": ("def f(n):\n    return f(n + 1)\nf(0)\n" + GOOD, "failed"),
        "recursion limit raised": ("import sys\nsys.setrecursionlimit(10**8)\n"
                                   "def f(n):\n    return f(n + 1)\nf(0)\n" + GOOD, None),
        "huge allocation": ("x = bytearray(64 << 30)\n" + GOOD, "failed"),
        "huge list": ("x = [0] * (1 << 33)\n" + GOOD, "failed"),
        "output flood": ("while True:\n    print('x' * 10000)\n" + GOOD, "timeout"),
        "stdin input()": ("s = input()\n" + GOOD, "failed"),
        "sys.exit(0)": (GOOD + "import sys\nsys.exit(0)\n", "failed"),
        "os._exit(0)": (GOOD + "import os\nos._exit(0)\n", "failed"),
        "exit() in a test": (GOOD, "failed"),          # tests below get an extra exit() assert
        "delete outside": (f"import os\nos.remove({keep!r})\n" + GOOD, "failed"),
        "rmtree outside": (f"import shutil\nshutil.rmtree({str(outside)!r})\n" + GOOD, "failed"),
        "overwrite outside": (f"open({keep!r}, 'w').write('gone')\n" + GOOD, "failed"),
        "append outside": (f"open({keep!r}, 'a').write('more')\n" + GOOD, "failed"),
        "create outside": (f"open({str(outside / 'new.txt')!r}, 'x')\n" + GOOD, "failed"),
        "mkdir outside": (f"import os\nos.mkdir({str(outside / 'newdir')!r})\n" + GOOD, "failed"),
        "os.open outside": (f"import os\nos.open({keep!r}, os.O_WRONLY | os.O_TRUNC)\n" + GOOD, "failed"),
        "rename outside": (f"import os\nos.rename({keep!r}, {keep + '.moved'!r})\n" + GOOD, "failed"),
        "os.system": ("import os\nos.system('rm -rf /tmp/x')\n" + GOOD, "failed"),
        "subprocess": ("import subprocess\nsubprocess.run(['true'])\n" + GOOD, "failed"),
        "fork": ("import os\nos.fork()\n" + GOOD, "failed"),
        "kill parent": ("import os\nos.kill(os.getppid(), 9)\n" + GOOD, "failed"),
        "stray writes to fds": ("import os\nfor fd in range(3, 256):\n    try:\n"
                                "        os.write(fd, b'0' * 32)\n    except OSError:\n"
                                "        pass\n" + GOOD, "failed"),
        "write inside": ("open('scratch.txt', 'w').write('ok')\nimport os\nos.mkdir('d')\n"
                         "assert open('scratch.txt').read() == 'ok'\n" + GOOD, "passed"),
        "sys.stdin.read()": ("import sys\nassert sys.stdin.read() == ''\n" + GOOD, "passed"),
        "stdout closed": (GOOD + "import os, sys\nsys.stdout.flush()\nos.close(1)\n", "passed"),
        "finite flood": ("for _ in range(300):\n    print('y' * 10000)\n" + GOOD, "passed"),
        "main block": (GOOD + "if __name__ == '__main__':\n    input()\n", "passed"),
    }


@pytest.fixture(scope="module")
def hostile(outside):
    cases = _cases(outside)
    jobs = [(code, TESTS + (["exit()"] if name == "exit() in a test" else []))
            for name, (code, _) in cases.items()]
    results = run_many(jobs, timeout=TIMEOUT, workers=8)
    return {name: (expected, r) for (name, (_, expected)), r in zip(cases.items(), results)}


@pytest.mark.parametrize("name", list(_cases(Path("/x"))))
def test_hostile_program(hostile, outside, name):
    expected, r = hostile[name]
    if expected is None:   # ends either way (RecursionError, memory or CPU limit), never passes
        assert not r.passed
    else:
        assert r.status == expected, r.output[-500:]
    assert r.passed == (expected == "passed")
    assert r.seconds < TIMEOUT + 5            # ended by the deadline at the latest
    assert len(r.output.encode()) <= OUTPUT_LIMIT + 4   # (+ a replacement character or so)
    assert (outside / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_timeout_kills_the_whole_group():
    """A grandchild (posix.fork gets around the os.fork guard) dies with the group at the deadline.
    As non-root, RLIMIT_NPROC = 0 already refuses the fork: then the run must just fail."""
    code = ("import posix, time\npid = posix.fork()\nif pid == 0:\n    while True:\n"
            "        time.sleep(0.05)\nprint(pid, flush=True)\ntime.sleep(60)\n")
    r = run_program(code, ["assert True"], timeout=1.0)
    assert not r.passed and r.seconds < 1.0 + 5
    if "BlockingIOError" in r.output:
        return
    assert r.status == "timeout" and r.returncode == -9
    pid = int(r.output.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat")
        state = stat.read_text().rsplit(")", 1)[1].split()[0] if stat.exists() else "gone"
        if state in ("gone", "Z"):   # reaped, or a zombie waiting for init
            break
        time.sleep(0.05)
    assert state in ("gone", "Z")


def test_temporary_directory_is_removed():
    r = run_program("import os\nprint(os.getcwd())\n", ["assert True"])
    cwd = r.output.strip()
    assert r.passed and os.path.basename(cwd).startswith("soka-sandbox-")
    assert not os.path.exists(cwd)


@pytest.mark.skipif(landlock_abi() == 0, reason="this kernel has no Landlock; only the Python guards apply")
@pytest.mark.parametrize("attack", [
    "import _io\n_io.FileIO({keep!r}, 'w').write(b'gone')",                      # under open()
    "import ctypes\nassert ctypes.CDLL(None).unlink({keep!r}.encode()) != 0",     # under os.unlink
    "import ctypes\nassert ctypes.CDLL(None).rename({keep!r}.encode(), b'/tmp/x') != 0",
])
def test_landlock_stops_what_the_python_guards_miss(outside, attack):
    keep = str(outside / "keep.txt")
    r = run_program(attack.format(keep=keep) + "\n" + GOOD, TESTS, timeout=TIMEOUT)
    assert (outside / "keep.txt").read_text() == "precious"
    # FileIO raises PermissionError; the ctypes calls return -1 (EACCES), and the asserts hold.
    assert r.passed == ("ctypes" in attack), r.output[-300:]


def _mbpp_test_split():
    rows = [json.loads(line) for line in open(DATA / "mbpp" / "mbpp.jsonl", encoding="utf-8")]
    return [r for r in rows if 11 <= r["task_id"] <= 510]


def _break_one(tests, k):
    """`assert x` -> `assert not (x)` for the k-th test (any message kept)."""
    node = ast.parse(tests[k]).body[0]
    node.test = ast.UnaryOp(ast.Not(), node.test)
    return tests[:k] + [ast.unparse(node)] + tests[k + 1:]


@pytest.mark.skipif(not (DATA / "mbpp" / "mbpp.jsonl").is_file(), reason=f"{DATA}/mbpp absent")
def test_mbpp_reference_solutions_pass_and_a_broken_assert_fails():
    """All 500 test-split reference solutions pass their own asserts (none is known to fail), and
    each fails once one of its asserts (rotating by task id) is negated. Task 123 takes ~4 s of CPU,
    hence the generous timeout."""
    tasks = _mbpp_test_split()
    assert len(tasks) == 500
    jobs = [(r["code"], r["test_list"], r["test_setup_code"]) for r in tasks]
    jobs += [(r["code"], _break_one(r["test_list"], r["task_id"] % len(r["test_list"])),
              r["test_setup_code"]) for r in tasks]
    results = run_many(jobs, timeout=60.0, workers=2 * (os.cpu_count() or 1))  # partly start-up waits
    refs, broken = results[:500], results[500:]
    failing = {r["task_id"]: x.status for r, x in zip(tasks, refs) if not x.passed}
    assert failing == {}, failing
    still_passing = [r["task_id"] for r, x in zip(tasks, broken) if x.passed]
    assert still_passing == []
