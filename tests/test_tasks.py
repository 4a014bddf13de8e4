"""Tasks: the data files and their splits, the downloader (against a loopback HTTP server serving a
data directory), the MATH tarball conversion, prompt formats and masked training examples.

GSM8K is the copy shipped with soka; MATH, MATH-500 and MBPP are conftest.py's small hand-written
files (the `data` fixture: again on the full files with --data-dir)."""
import functools
import hashlib
import http.server
import io
import json
import lzma
import re
import shutil
import socket
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest

import soka.tasks as tasks
from soka.scorers import gsm8k_extract, math_last_boxed
from soka.tasks import (ANSWER_CUE, FILES, IGNORE_INDEX, MBPP_TASK_IDS, SPLITS, build_examples,
                        download, encode_example, format_prompt, load_examples, math_from_tar,
                        user_message)



def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class CharTokenizer:
    """A stand-in with the agreed surface: one id per character (offset 4), bos 1, eos 2, and
    ChatML-like specials that become single ids, as in the BPE tokenizer."""

    SPECIAL = {"<|im_start|>": 3, "<|im_end|>": 2}

    def __init__(self, *, chat, end_of_turn_is_eos=True):
        self.has_chat_template, self.add_bos = chat, not chat
        self.bos_id, self.eos_id, self.pad_id, self.vocab_size = 1, 2, 2, 0x110000 + 4
        self.end_of_turn = "<|im_end|>" if chat else ""
        if not end_of_turn_is_eos:
            self.SPECIAL = {"<|im_start|>": 3, "<|im_end|>": 0}

    def encode(self, text, *, bos=None, eos=False):
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) else []
        for piece in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            ids += [self.SPECIAL[piece]] if piece in self.SPECIAL else [ord(c) + 4 for c in piece]
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids):
        names = {v: k for k, v in self.SPECIAL.items() if v not in (self.eos_id,)}
        return "".join(names.get(i, chr(i - 4) if i >= 4 else "") for i in ids)

    def chat_prompt(self, user, *, system=None):
        if not self.has_chat_template:
            return user
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------ the splits

def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _every_split(data_dir):
    examples = {(task, split): load_examples(task, split, data_dir=data_dir)
                for task, splits in SPLITS.items() for split in splits}
    for (task, split), exs in examples.items():
        assert exs and len({e["id"] for e in exs}) == len(exs), (task, split)
        assert all(e["question"] and e["target"] and e["gold"] is not None for e in exs), (task, split)
        if task == "mbpp":
            assert all(len(e["tests"]) == 3 and "\r" not in e["target"] for e in exs)
    return examples


def test_splits_hold_the_rows_of_their_files(data):
    """Each split is its file's rows, in order: MATH by line, MBPP by task_id range; GSM8K's sizes."""
    examples = _every_split(data)
    assert (len(examples["gsm8k", "train"]), len(examples["gsm8k", "test"])) == (7473, 1319)
    for split in SPLITS["math"]:
        rows = _rows(data / "math" / f"{split}.jsonl")
        assert [(e["id"], e["question"], e["target"]) for e in examples["math", split]] == \
               [(r["unique_id"], r["problem"], r["solution"]) for r in rows]
    rows = _rows(data / "mbpp" / "mbpp.jsonl")
    for split, (lo, hi) in MBPP_TASK_IDS.items():
        assert [int(e["id"]) for e in examples["mbpp", split]] == [r["task_id"] for r in rows if lo <= r["task_id"] <= hi]
        assert [e["tests"] for e in examples["mbpp", split]] == [r["test_list"] for r in rows if lo <= r["task_id"] <= hi]


@pytest.mark.extended
def test_split_sizes_and_ids(full_data):
    sizes = {("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("math", "train"): 7500,
             ("math", "test"): 5000, ("math", "math500"): 500, ("mbpp", "prompt"): 10,
             ("mbpp", "test"): 500, ("mbpp", "validation"): 90, ("mbpp", "train"): 374}
    assert set(sizes) == {(t, s) for t, splits in SPLITS.items() for s in splits}
    examples = _every_split(full_data)
    for (task, split), n in sizes.items():
        assert len(examples[task, split]) == n
        if task == "mbpp":
            lo, hi = MBPP_TASK_IDS[split]
            assert [int(e["id"]) for e in examples[task, split]] == list(range(lo, hi + 1))


def test_gsm8k_targets_strip_calculator_annotations(tmp_path):
    """The shipped GSM8K (read from an empty data directory)."""
    for e in load_examples("gsm8k", "train", data_dir=tmp_path):
        assert "<<" not in e["target"] and ">>" not in e["target"]
        assert re.search(r"#### [-\d,.]+$", e["target"])
        assert gsm8k_extract(e["target"]) == e["gold"] and "," not in e["gold"]
    first = load_examples("gsm8k", "test", data_dir=tmp_path)[0]
    assert first["target"].startswith("Janet sells 16 - 3 - 4 = 9 duck eggs a day.")
    assert tasks.data_file("gsm8k", "test", tmp_path) == tasks.SHIPPED / "gsm8k" / "test.jsonl.xz"


def test_math_gold_is_the_last_box_and_math500_matches_test(data):
    test = {e["id"]: e for e in load_examples("math", "test", data_dir=data)}
    for e in test.values():
        assert e["gold"] == math_last_boxed(e["target"]) and e["level"] in (1, 2, 3, 4, 5)
    for e in load_examples("math", "math500", data_dir=data):
        t = test[e["id"]]
        assert (e["question"], e["target"], e["subject"], e["level"]) == \
               (t["question"], t["target"], t["subject"], t["level"])
        assert e["gold"] == t["gold"]


def _unpack_math(data, split, root):
    """The original per-problem layout, rebuilt from the JSON-lines file."""
    for r in _rows(data / "math" / f"{split}.jsonl"):
        path = root / r.pop("unique_id")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=4), encoding="utf-8")


def test_math_per_problem_folders_load_the_same(tmp_path, data):
    for split in ("train", "test"):
        _unpack_math(data, split, tmp_path / "math")
        assert not (tmp_path / "math" / f"{split}.jsonl").exists()
        assert load_examples("math", split, data_dir=tmp_path) == load_examples("math", split, data_dir=data)


@pytest.fixture(scope="module")
def math_tar(tmp_path_factory, data):
    """The original release's layout (MATH/{train,test}/<subject>/<n>.json) as a tarball."""
    path = tmp_path_factory.mktemp("tar") / "MATH.tar"
    with tarfile.open(path, "w") as tar:
        for split in ("train", "test"):
            for r in _rows(data / "math" / f"{split}.jsonl"):
                uid = r.pop("unique_id")
                blob = json.dumps(r, indent=4).encode()
                info = tarfile.TarInfo(f"MATH/{uid}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


def test_math_from_tar_reproduces_the_files(tmp_path, math_tar, data):
    expected = {split: _sha(data / "math" / f"{split}.jsonl") for split in ("train", "test")}
    math_from_tar(math_tar, tmp_path / "out", expected=expected)
    for split in ("train", "test"):
        assert (tmp_path / "out" / f"{split}.jsonl").read_bytes() == (data / "math" / f"{split}.jsonl").read_bytes()
    with pytest.raises(ValueError, match="sha256"):   # a tarball whose test split differs
        math_from_tar(math_tar, tmp_path / "bad", expected={**expected, "test": "0" * 64})
    assert not (tmp_path / "bad" / "test.jsonl").exists()


def test_a_broken_math_tarball_is_one_value_error_naming_it(tmp_path):
    # tarfile raises its own TarError, which the run's one-line error handling would not catch
    path = tmp_path / "MATH.tar"
    path.write_bytes(b"not a tarball at all" * 100)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable MATH tarball"):
        math_from_tar(path, tmp_path / "out")
    for blob, message in [(b"[1, 2]", "holds a JSON list, not an object"), (b"{", ": not valid JSON")]:
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("MATH/test/algebra/1.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        with pytest.raises(ValueError, match=r"MATH/test/algebra/1\.json ?" + message):
            math_from_tar(path, tmp_path / "out")


# ------------------------------------------------------------------------------------ downloader

def test_file_table_matches_the_docs():
    """docs/tasks.md's table of files, sources and sha256 prefixes says what FILES says."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text(encoding="utf-8")
    listed = {}
    for paths, source, digests in re.findall(r"^\| (`[a-z0-9/._]+`.*?) \| (.+?) \| (`[0-9a-f]{8}….*?) \|$", doc, re.M):
        for path, digest in zip(re.findall(r"`([^`]+)`", paths), re.findall(r"`([0-9a-f]{8})…`", digests), strict=True):
            listed[path] = digest, re.search(r"`([^`]+)`", source).group(1)
    assert set(listed) == {f.path for files in FILES.values() for f in files}
    for f in (f for files in FILES.values() for f in files):
        digest, source = listed[f.path]
        assert f.sha256.startswith(digest) and f.url.startswith("https://"), f.path
        assert all(piece in f.url for piece in source.split("…")), (f.path, source)


@pytest.mark.extended
def test_given_files_have_the_listed_sha256(full_data):
    for f in (f for files in FILES.values() for f in files):
        assert _sha(full_data / f.path) == f.sha256, f.path


class _Server:
    """http.server on 127.0.0.1 serving a folder, counting GET requests."""

    def __init__(self, folder):
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _shipped_gsm8k(folder):
    """gsm8k/{train,test}.jsonl as openai/grade-school-math has them, from the copy shipped with soka."""
    (folder / "gsm8k").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (folder / "gsm8k" / f"{split}.jsonl").write_bytes(lzma.decompress(
            (tasks.SHIPPED / "gsm8k" / f"{split}.jsonl.xz").read_bytes()))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, data):
    """A mirror laid out like the data directory, with every file FILES names: the data's MATH and
    MBPP, GSM8K from the data or else the shipped copy."""
    d = tmp_path_factory.mktemp("mirror")
    _shipped_gsm8k(d)
    for f in (f for files in FILES.values() for f in files):
        if (data / f.path).is_file():
            (d / f.path).parent.mkdir(exist_ok=True)
            shutil.copy(data / f.path, d / f.path)
    return d


@pytest.fixture
def server(mirror, monkeypatch):
    """The mirror, served; FILES lists its files' sha256 (for the full data: the ones FILES has)."""
    monkeypatch.setattr(tasks, "FILES", {task: tuple(replace(f, sha256=_sha(mirror / f.path)) for f in files)
                                         for task, files in FILES.items()})
    s = _Server(mirror)
    s.folder = mirror
    yield s
    s.close()


def _leftovers(folder):
    return [p for p in Path(folder).rglob("*") if ".part-" in p.name]


def test_download_checks_caches_and_repairs(tmp_path, server):
    paths = download(data_dir=tmp_path, base_url=server.url, progress=False)
    assert len(server.requests) == 6 == len(paths)
    for f in (f for files in tasks.FILES.values() for f in files):
        assert (tmp_path / f.path).read_bytes() == (server.folder / f.path).read_bytes()
    download(data_dir=tmp_path, base_url=server.url, progress=False)
    assert len(server.requests) == 6                               # all cached
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text("damaged")
    download("mbpp", data_dir=tmp_path, base_url=server.url, progress=False)
    assert server.requests[6:] == ["/mbpp/mbpp.jsonl"]             # only the bad copy
    assert _sha(tmp_path / "mbpp" / "mbpp.jsonl") == tasks.FILES["mbpp"][0].sha256
    download("gsm8k", data_dir=tmp_path, base_url=server.url, progress=False, force=True)
    assert len(server.requests) == 9
    assert _leftovers(tmp_path) == []


def test_download_rejects_a_wrong_sha256(tmp_path):
    mirror = tmp_path / "mirror"
    _shipped_gsm8k(mirror)
    with open(mirror / "gsm8k" / "test.jsonl", "a") as f:
        f.write("\n")
    s = _Server(mirror)
    try:
        with pytest.raises(ValueError, match="sha256"):
            download("gsm8k", data_dir=tmp_path / "data", base_url=s.url, progress=False)
    finally:
        s.close()
    assert (tmp_path / "data" / "gsm8k" / "train.jsonl").is_file()      # the good one landed
    assert not (tmp_path / "data" / "gsm8k" / "test.jsonl").exists()    # the bad one did not
    assert _leftovers(tmp_path / "data") == []


def test_offline_error_says_which_file_goes_where(tmp_path):
    with socket.socket() as sock:   # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError) as err:
        download("mbpp", data_dir=tmp_path, base_url=f"http://127.0.0.1:{port}", progress=False)
    f = FILES["mbpp"][0]
    assert str(tmp_path / "mbpp" / "mbpp.jsonl") in str(err.value)
    assert f.sha256 in str(err.value) and f.url in str(err.value)
    assert not (tmp_path / "mbpp").exists()                   # nothing made where nothing came
    with pytest.raises(FileNotFoundError) as err:
        load_examples("mbpp", "test", data_dir=tmp_path)
    assert str(tmp_path / "mbpp" / "mbpp.jsonl") in str(err.value)
    assert "python -m soka.tasks" in str(err.value)


def test_load_examples_can_download(tmp_path, server):
    examples = load_examples("math", "math500", data_dir=tmp_path, download=True, base_url=server.url)
    assert len(examples) == len(_rows(server.folder / "math" / "math500.jsonl"))
    assert server.requests == ["/math/train.jsonl", "/math/test.jsonl", "/math/math500.jsonl"]


def test_download_math_through_the_tarball(tmp_path, math_tar, monkeypatch, data):
    """Without a mirror, MATH train/test come from MATH.tar: fetched, converted, checked, removed.
    The canonical URLs are pointed at loopback copies, FILES' digests at the data's files."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(math_tar, served / "MATH.tar")
    shutil.copy(data / "math" / "math500.jsonl", served / "test.jsonl")
    s = _Server(served)
    try:
        url = {tasks.MATH_TAR_URL: f"{s.url}/MATH.tar"}
        monkeypatch.setattr(tasks, "FILES", {**FILES, "math": tuple(
            replace(f, url=url.get(f.url, f"{s.url}/test.jsonl"), sha256=_sha(data / f.path)) for f in FILES["math"])})
        monkeypatch.setattr(tasks, "MATH_TAR_URL", f"{s.url}/MATH.tar")
        download("math", data_dir=tmp_path / "data", progress=False)
    finally:
        s.close()
    assert s.requests == ["/MATH.tar", "/test.jsonl"]                   # the tarball only once
    for name in ("train.jsonl", "test.jsonl", "math500.jsonl"):
        assert (tmp_path / "data" / "math" / name).read_bytes() == (data / "math" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "data" / "math").iterdir()) == \
           ["math500.jsonl", "test.jsonl", "train.jsonl"]                # MATH.tar removed


def test_unknown_task_or_split(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        load_examples("humaneval", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no split"):
        load_examples("gsm8k", "validation", data_dir=tmp_path)


# --------------------------------------------------------------------------------------- prompts

def test_prompt_formats(small_data):
    g = load_examples("gsm8k", "test", data_dir=small_data)[0]
    m = load_examples("math", "math500", data_dir=small_data)[0]
    b = load_examples("mbpp", "test", data_dir=small_data)[0]
    assert g["question"] in user_message("gsm8k", g) and '"#### <number>"' in user_message("gsm8k", g)
    assert m["question"] in user_message("math", m) and "\\boxed{}" in user_message("math", m)
    msg = user_message("mbpp", b)
    assert msg.startswith("You are an expert Python programmer, and here is your task: " + b["question"])
    assert msg.endswith("\n\n" + "\n".join(b["tests"]))
    chat, plain = CharTokenizer(chat=True), CharTokenizer(chat=False)
    for task, ex in (("gsm8k", g), ("math", m), ("mbpp", b)):
        assert format_prompt(task, ex, chat) == chat.chat_prompt(user_message(task, ex))
        assert format_prompt(task, ex, chat).endswith("<|im_start|>assistant\n")
        assert format_prompt(task, ex, plain) == user_message(task, ex) + ANSWER_CUE


# ------------------------------------------------------------------------------ training examples

def _sentencepiece(data):
    """The data directory's LLaMA 2 tokenizer.model (the small one conftest.py trains, or LLaMA 2's)."""
    from soka.tokenizer import SentencePieceTokenizer
    return SentencePieceTokenizer(data / "llama2-tokenizer" / "tokenizer.model")


def test_encode_example_masks_the_prompt_llama2(data):
    tok = _sentencepiece(data)
    for task in ("gsm8k", "math", "mbpp"):
        ex = load_examples(task, "train", data_dir=data)[3]
        e = encode_example(task, ex, tok, max_len=4096)
        prompt = tok.encode(format_prompt(task, ex, tok))
        n = len(prompt)
        assert prompt[0] == tok.bos_id and e["input_ids"][:n] == prompt
        assert e["labels"][:n] == [IGNORE_INDEX] * n
        assert e["labels"][n:] == e["input_ids"][n:] and e["input_ids"][-1] == tok.eos_id
        assert e["input_ids"].count(tok.eos_id) == 1 and not e["truncated"]
        assert tok.decode(e["input_ids"][n:]) == ex["target"]


def test_truncation_policy(data):
    tok = _sentencepiece(data)
    ex = load_examples("gsm8k", "train", data_dir=data)[0]
    n = len(tok.encode(format_prompt("gsm8k", ex, tok)))
    full = encode_example("gsm8k", ex, tok, max_len=4096)
    cut = encode_example("gsm8k", ex, tok, max_len=n + 5)
    assert cut["truncated"] and len(cut["input_ids"]) == n + 5
    assert cut["input_ids"] == full["input_ids"][:n + 5] and cut["labels"] == full["labels"][:n + 5]
    assert cut["input_ids"][-1] != tok.eos_id
    assert encode_example("gsm8k", ex, tok, max_len=n) is None     # no room for the answer
    exact = encode_example("gsm8k", ex, tok, max_len=len(full["input_ids"]))
    assert exact == full

    examples = load_examples("gsm8k", "test", data_dir=data)[:40]
    lengths = [(len(tok.encode(format_prompt("gsm8k", e, tok))),
                len(encode_example("gsm8k", e, tok, max_len=4096)["input_ids"])) for e in examples]
    max_len = sorted(p for p, _ in lengths)[30]
    encoded, counts = build_examples("gsm8k", examples, tok, max_len=max_len)
    assert counts == {"kept": sum(p < max_len for p, _ in lengths),
                      "truncated": sum(p < max_len < t for p, t in lengths),
                      "dropped": sum(p >= max_len for p, _ in lengths)}
    assert all(len(e["input_ids"]) <= max_len for e in encoded) and counts["dropped"] > 0


def test_end_of_turn_then_eos_once(small_data):
    ex = load_examples("mbpp", "train", data_dir=small_data)[0]
    same = CharTokenizer(chat=True)                               # <|im_end|> is the eos id
    e = encode_example("mbpp", ex, same, max_len=10_000)
    n = e["labels"].count(IGNORE_INDEX)
    assert e["input_ids"][-1] == 2 and e["input_ids"][n:].count(2) == 1
    other = CharTokenizer(chat=True, end_of_turn_is_eos=False)   # <|im_end|> then eos
    e = encode_example("mbpp", ex, other, max_len=10_000)
    assert e["input_ids"][-2:] == [0, 2]
    n = len(other.encode(format_prompt("mbpp", ex, other)))
    assert other.decode(e["input_ids"][n:-2]) == ex["target"]


def test_smollm2_chat_example(demo_gguf, tmp_path):
    from soka.gguf import read_gguf
    from soka.tokenizer import BPETokenizer
    tok = BPETokenizer.from_gguf(read_gguf(demo_gguf).metadata)
    ex = load_examples("gsm8k", "train", data_dir=tmp_path)[0]
    text = format_prompt("gsm8k", ex, tok)
    assert text.endswith("<|im_start|>assistant\n") and ex["question"] in text
    e = encode_example("gsm8k", ex, tok, max_len=2048)
    n = e["labels"].count(IGNORE_INDEX)
    assert e["input_ids"][-1] == tok.eos_id and e["input_ids"][n:].count(tok.eos_id) == 1
    assert tok.decode(e["input_ids"][n:]).strip() == ex["target"].strip()


@pytest.mark.parametrize("line, message", [
    ('{"question": "q"}', r"line 2: 'answer' should be a str, got no such key"),
    ('{"question": "q", "answer": "42"}', r"line 2: the answer has no final '#### <number>' line"),
    ('["q", "#### 1"]', r"line 2: a JSON list, not an object"),
    ('{"question": "q", "answer": "#### 1"', r"line 2: not valid JSON \(Expecting ',' delimiter at column 37\)"),
    ('{"question": 7, "answer": "#### 1"}', r"line 2: 'question' should be a str, got a int"),
])
def test_a_bad_gsm8k_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    path.write_text('{"question": "q", "answer": "#### 1"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ", " + message):
        load_examples("gsm8k", "test", data_dir=tmp_path)


MATH_ROW = dict(problem="p", solution=r"so \boxed{3}", level="Level 1", type="Algebra", unique_id="test/algebra/1.json")


@pytest.mark.parametrize("change, message", [
    (dict(type=""), "no 'level', or neither 'subject' nor 'type' names the subject"),
    (dict(solution="no box"), r"no 'answer', and the solution has no \\boxed\{...\} answer"),
    (dict(answer=None), "'answer' should be a str, got a NoneType"),
])
def test_a_math_row_without_subject_or_answer_is_refused(tmp_path, change, message):
    path = tmp_path / "math" / "test.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(MATH_ROW) + "\n" + json.dumps(MATH_ROW | change) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: ") + message):
        load_examples("math", "test", data_dir=tmp_path)


@pytest.mark.parametrize("tests", [[], [1, 2]])
def test_an_mbpp_row_without_assert_statements_is_refused(tmp_path, tests):
    path = tmp_path / "mbpp" / "mbpp.jsonl"
    path.parent.mkdir()
    row = dict(task_id=11, text="t", code="def f(): pass", test_list=tests, test_setup_code="")
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 1: 'test_list' should be a non-empty list of "
                                                   "assert statements (str)")):
        load_examples("mbpp", "test", data_dir=tmp_path)


def test_a_huge_number_or_a_damaged_shipped_copy_is_one_error(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    path.write_text('{"question": "q", "answer": "#### ' + "1" * 5000 + '", "n": ' + "1" * 5000 + "}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 1: a number of more than 4,300 digits")):
        load_examples("gsm8k", "test", data_dir=tmp_path)
    damaged = tmp_path / "test.jsonl.xz"
    damaged.write_bytes(b"\xfd7zXZ\x00 not the rest of an xz file")
    with pytest.raises(ValueError, match=re.escape(f"{damaged}: not a readable xz file") + ".*shipped copy is damaged"):
        tasks._open(damaged)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n\n{"question": "\xff", "answer": "#### 2"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: not UTF-8 text (invalid start byte at byte 14)")):
        load_examples("gsm8k", "test", data_dir=tmp_path)
