"""GSM8K, MATH and MBPP: the data files, a downloader, one prompt format per task, training examples.

    python -m soka.tasks --data-dir data                         # fetch every file, sha256-checked
    python -m soka.tasks --data-dir data --task mbpp --base-url http://127.0.0.1:8000   # a mirror

    examples = load_examples("gsm8k", "test", data_dir="data")   # [{"id", "question", "target", "gold", ...}]
    text = format_prompt("gsm8k", examples[0], tokenizer)         # ends where the answer begins
    encoded, counts = build_examples("gsm8k", examples, tokenizer, max_len=512)

The data directory's layout:

    gsm8k/train.jsonl  gsm8k/test.jsonl          openai/grade-school-math, byte-identical (also
                                                 shipped in soka/data/gsm8k/, xz-compressed: read
                                                 when the data directory has no gsm8k/ files)
    math/train.jsonl   math/test.jsonl           MATH as one JSON line per problem (or the original
                                                 per-problem folders math/{train,test}/<subject>/<n>.json)
    math/math500.jsonl                           PRM800K's 500-problem test subset
    mbpp/mbpp.jsonl                              google-research MBPP (974 tasks)

Prompt formats, targets and the truncation policy are in docs/tasks.md.
"""
import argparse
import hashlib
import io
import json
import lzma
import os
import re
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from soka.scorers import math_last_boxed

DATA_DIR = "data"
SHIPPED = Path(__file__).resolve().parent / "data"   # GSM8K (MIT licence), so the main job runs offline
TASKS = ("gsm8k", "math", "mbpp")
SPLITS = {"gsm8k": ("train", "test"), "math": ("train", "test", "math500"),
          "mbpp": ("prompt", "train", "validation", "test")}
MBPP_TASK_IDS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
IGNORE_INDEX = -100  # label of a position the loss skips (the prompt)


@dataclass(frozen=True)
class DataFile:
    path: str    # under the data directory; also the path under a --base-url mirror
    url: str     # canonical source
    sha256: str  # of the file as stored (of the decompressed file, for the shipped GSM8K)


_GSM8K = ("https://raw.githubusercontent.com/openai/grade-school-math/"
          "3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/")
# The original MATH release: MATH/{train,test}/<subject>/<n>.json. No digest of the tarball is
# published, so the two JSON-lines files converted from it are what gets checked.
MATH_TAR_URL = "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar"
FILES = {
    "gsm8k": (
        DataFile("gsm8k/train.jsonl", _GSM8K + "train.jsonl",
                 "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
        DataFile("gsm8k/test.jsonl", _GSM8K + "test.jsonl",
                 "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    ),
    "math": (
        DataFile("math/train.jsonl", MATH_TAR_URL,
                 "00aa30008a611172529ab775ed6f3af9efd32974625b19181c3ebfc724134e52"),
        DataFile("math/test.jsonl", MATH_TAR_URL,
                 "1b833f0f8869d7cb975debfe04f0697bd23455c388045ba9159e5046d37df5fa"),
        # PRM800K keeps this file in Git LFS; raw.githubusercontent.com would serve the pointer.
        DataFile("math/math500.jsonl", "https://media.githubusercontent.com/media/openai/prm800k/"
                 "7ecc794703b2877f63226f2477a49b34f9b25163/prm800k/math_splits/test.jsonl",
                 "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132"),
    ),
    "mbpp": (
        DataFile("mbpp/mbpp.jsonl", "https://raw.githubusercontent.com/google-research/"
                 "google-research/30adf0ec5f35f9609c2f1d896005e184195d9146/mbpp/mbpp.jsonl",
                 "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"),
    ),
}


# ------------------------------------------------------------------------------------ downloader

def file_sha256(path):
    """The file's sha256, hex, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _by_hand(dest, f):
    return (f"put the file there yourself: {dest} (sha256 {f.sha256}, from {f.url}"
            + (", converted by `soka.tasks.math_from_tar`" if f.url == MATH_TAR_URL else "")
            + f"), or pass --data-dir with a folder that holds {f.path}")


def _fetch(url, dest, sha256, *, progress, hint):
    """url -> dest through a temporary file in the same folder: `dest` appears complete and checked,
    or not at all. `sha256=None` skips the check (the caller checks what it makes of the file)."""
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    try:
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as r:
            dest.parent.mkdir(parents=True, exist_ok=True)       # once the server answers: offline, no folders
            with open(tmp, "wb") as out:
                size = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                    for chunk in iter(lambda: r.read(1 << 16), b""):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        if sha256 is not None and h.hexdigest() != sha256:
            raise ValueError(f"soka/tasks.py: {url} has sha256 {h.hexdigest()}, expected {sha256}; "
                             f"{dest} was not written")
        os.replace(tmp, dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise ConnectionError(f"soka/tasks.py: could not fetch {url} ({e}); if offline, {hint}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _write_checked(dest, data, sha256, source="MATH.tar"):
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"soka/tasks.py: {dest.name} made from {source} has sha256 {got}, "
                         f"expected {sha256}; {dest} was not written")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def math_from_tar(tar_path, out_dir, *, expected=None):
    """MATH.tar (…/{train,test}/<subject>/<n>.json) -> out_dir/{train,test}.jsonl.

    The conversion: the four fields unchanged, `unique_id` added
    ("test/algebra/1.json"), sorted by subject folder then number, one `json.dumps(...,
    ensure_ascii=False)` line each. `expected` maps split -> sha256 that each output must have.
    """
    rows = {"train": [], "test": []}
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                m = re.search(r"(?:^|/)(train|test)/([a-z_]+)/(\d+)\.json$", member.name)
                if member.isfile() and m:
                    split, subject, n = m.groups()
                    try:
                        record = json.load(tar.extractfile(member))
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise ValueError(f"{member.name}: not valid JSON ({e})") from None
                    if not isinstance(record, dict):
                        raise ValueError(f"{member.name} holds a JSON {type(record).__name__}, not an object")
                    record["unique_id"] = f"{split}/{subject}/{n}.json"
                    rows[split].append((subject, int(n), record))
    except (tarfile.TarError, ValueError, EOFError, zlib.error) as e:   # truncated or foreign, a bad record
        raise ValueError(f"soka/tasks.py: {tar_path}: not a readable MATH tarball ({e})") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        if not items:
            raise ValueError(f"soka/tasks.py: {tar_path} has no {split}/<subject>/<n>.json files")
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, _, r in sorted(items, key=lambda t: t[:2]))
        dest = out_dir / f"{split}.jsonl"
        if expected is None:
            tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
            tmp.write_bytes(data.encode())
            os.replace(tmp, dest)
        else:
            _write_checked(dest, data.encode(), expected[split])


def download(task=None, *, data_dir=DATA_DIR, base_url=None, force=False, progress=True):
    """Fetch the files of `task` (default: all) into data_dir; return their paths.

    A file already there with the right sha256 is kept (the cache); `force` fetches anyway.
    `base_url` is a mirror with the data directory's layout: <base_url>/<path>, e.g.
    http://127.0.0.1:8000/gsm8k/test.jsonl. Without it GSM8K is written from the copy shipped
    with soka, MATH train/test come from MATH.tar (converted here and checked against the expected
    sha256), and MATH-500 and MBPP from their canonical sources.
    """
    data_dir = Path(data_dir)
    files = [f for t in (TASKS if task is None else (task,)) for f in FILES[_check_task(t)]]
    todo = [f for f in files
            if force or not (data_dir / f.path).is_file() or file_sha256(data_dir / f.path) != f.sha256]
    from_tar = False
    for f in todo:
        dest = data_dir / f.path
        if base_url:
            _fetch(f"{base_url.rstrip('/')}/{f.path}", dest, f.sha256, progress=progress,
                   hint=_by_hand(dest, f))
        elif (SHIPPED / f"{f.path}.xz").is_file():
            with _open(SHIPPED / f"{f.path}.xz") as src:
                _write_checked(dest, src.read(), f.sha256, source=f"the shipped {f.path}.xz")
        elif f.url == MATH_TAR_URL:
            if from_tar:
                continue  # made along with the other split
            from_tar = True
            tar_path = data_dir / "math" / "MATH.tar"
            _fetch(MATH_TAR_URL, tar_path, None, progress=progress, hint=_by_hand(dest, f))
            try:
                math_from_tar(tar_path, data_dir / "math",
                              expected={Path(g.path).stem: g.sha256 for g in FILES["math"]})
            finally:
                tar_path.unlink(missing_ok=True)
        else:
            _fetch(f.url, dest, f.sha256, progress=progress, hint=_by_hand(dest, f))
    return [data_dir / f.path for f in files]


# -------------------------------------------------------------------------------------- examples

def _check_task(task, split=None):
    if task not in TASKS:
        raise ValueError(f"soka/tasks.py: unknown task {task!r}; choose one of {TASKS}")
    if split is not None and split not in SPLITS[task]:
        raise ValueError(f"soka/tasks.py: {task} has no split {split!r}; choose one of {SPLITS[task]}")
    return task


def _need(data_dir, rel, task, download_, base_url):
    """The file to read: data_dir/rel; else the copy shipped with soka (GSM8K); else fetched."""
    path = Path(data_dir) / rel
    if path.is_file():
        return path
    if (SHIPPED / f"{rel}.xz").is_file():
        return SHIPPED / f"{rel}.xz"
    if download_:
        download(task, data_dir=data_dir, base_url=base_url)
        return path
    f = next(f for f in FILES[task] if f.path == rel)
    raise FileNotFoundError(f"soka/tasks.py: {path} is missing. Fetch it with `python -m "
                            f"soka.tasks --data-dir {data_dir} --task {task}`, or " + _by_hand(path, f))


def data_file(task, split, data_dir=DATA_DIR):
    """The file load_examples(task, split, data_dir=...) reads, if it is there (None if not)."""
    _check_task(task, split)
    rel = {"gsm8k": f"gsm8k/{split}.jsonl", "math": f"math/{split}.jsonl", "mbpp": "mbpp/mbpp.jsonl"}[task]
    for path in (Path(data_dir) / rel, SHIPPED / f"{rel}.xz", Path(data_dir) / "math" / split):
        if path.exists():
            return path
    return None


def _open(path):
    """A file of rows to read; a shipped .xz copy is decompressed and checked against its sha256."""
    if path.suffix != ".xz":
        return open(path, "rb")
    try:
        data = lzma.decompress(path.read_bytes())
    except lzma.LZMAError as e:
        raise ValueError(f"{path}: not a readable xz file ({e}); the shipped copy is damaged (get it again "
                         f"from the repository, or pass --data-dir with the original file)") from None
    want = next(f.sha256 for files in FILES.values() for f in files if Path(f.path).name == path.stem)
    if hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{path}: decompressed, its sha256 is not {want}; the shipped copy is damaged "
                         f"(get it again from the repository, or pass --data-dir with the original file)")
    return io.BytesIO(data)


def _jsonl(path, keys, check=None):
    """The JSON objects of a JSONL file, one per non-blank line, each holding `keys` {name: type} and
    passing `check` (row -> what is wrong, or None); anything else is a ValueError naming the file
    and the line."""
    rows = []
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}, line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError:                # an integer past Python's limit of 4,300 digits
                raise ValueError(f"{where}: a number of more than 4,300 digits") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a JSON {type(row).__name__}, not an object {{key: value}}")
            for key, kind in keys.items():
                if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                    got = "no such key" if key not in row else f"a {type(row[key]).__name__}"
                    raise ValueError(f"{where}: {key!r} should be a {kind.__name__}, got {got}")
            problem = check(row) if check else None
            if problem:
                raise ValueError(f"{where}: {problem}")
            rows.append(row)
    return rows


def _math_row(row):
    if "level" not in row or not any(isinstance(row.get(k), str) and row[k] for k in ("subject", "type")):
        return "no 'level', or neither 'subject' nor 'type' names the subject"
    if "answer" in row and not isinstance(row["answer"], str):
        return f"'answer' should be a str, got a {type(row['answer']).__name__}"
    if "answer" not in row and math_last_boxed(row["solution"]) is None:
        return "no 'answer', and the solution has no \\boxed{...} answer"
    return None


def _mbpp_row(row):
    tests = row["test_list"]
    if not tests or not all(isinstance(t, str) for t in tests):
        return "'test_list' should be a non-empty list of assert statements (str)"
    return None


def _gsm8k_answer(row):
    return None if "####" in row["answer"] else "the answer has no final '#### <number>' line"


def _math_folder(folder):
    """The original per-problem layout: <subject>/<n>.json, sorted by subject then number."""
    split = folder.name
    files = sorted((p for p in folder.glob("*/*.json") if p.stem.isdigit()), key=lambda p: (p.parent.name, int(p.stem)))
    rows = []
    for p in files:
        try:
            row = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:   # ValueError: JSON, or a huge int
            raise ValueError(f"{p}: not a JSON file of UTF-8 text ({type(e).__name__}: {e})") from None
        problem = ("not an object" if not isinstance(row, dict) else
                   "no 'problem' or 'solution'" if not {"problem", "solution"} <= row.keys() or
                   not isinstance(row["solution"], str) else _math_row(row))
        if problem:
            raise ValueError(f"{p}: {problem}")
        rows.append({**row, "unique_id": f"{split}/{p.parent.name}/{p.name}"})
    return rows


def load_examples(task, split, *, data_dir=DATA_DIR, download=False, base_url=None):
    """The split as a list of dicts with at least id, question, target (the training answer) and
    gold (what a completion is scored against); MBPP adds tests and setup_code.

    GSM8K target: the reference solution with its <<48/2=24>> calculator annotations removed, still
    ending in "#### N"; gold: N without commas. MATH target: the solution; gold: its last \\boxed{}
    (MATH-500: the `answer` field, the same string). MBPP target and gold: the reference code.
    """
    _check_task(task, split)
    if task == "gsm8k":
        rows = _jsonl(_need(data_dir, f"gsm8k/{split}.jsonl", task, download, base_url),
                      {"question": str, "answer": str}, _gsm8k_answer)
        return [{"id": f"{split}/{i}", "question": r["question"],
                 "target": re.sub(r"<<[^<>]*>>", "", r["answer"]),
                 "gold": r["answer"].rsplit("####", 1)[1].strip().replace(",", "")}
                for i, r in enumerate(rows)]
    if task == "math":
        folder = Path(data_dir) / "math" / split
        if split != "math500" and not (folder.parent / f"{split}.jsonl").is_file() and folder.is_dir():
            rows = _math_folder(folder)
        else:
            rows = _jsonl(_need(data_dir, f"math/{split}.jsonl", task, download, base_url),
                          {"unique_id": str, "problem": str, "solution": str}, _math_row)
        return [{"id": r["unique_id"], "question": r["problem"], "target": r["solution"],
                 "gold": r["answer"] if "answer" in r else math_last_boxed(r["solution"]),
                 "level": _level(r["level"]), "subject": r.get("subject") or r["type"]} for r in rows]
    lo, hi = MBPP_TASK_IDS[split]
    rows = _jsonl(_need(data_dir, "mbpp/mbpp.jsonl", task, download, base_url),
                  {"task_id": int, "text": str, "code": str, "test_list": list, "test_setup_code": str}, _mbpp_row)
    return [{"id": str(r["task_id"]), "question": r["text"], "target": _code(r["code"]),
             "gold": _code(r["code"]), "tests": r["test_list"], "setup_code": _code(r["test_setup_code"])}
            for r in rows if lo <= r["task_id"] <= hi]


def _level(level):
    """MATH writes "Level 3" (a few "Level ?"), MATH-500 writes 3: an int, or None."""
    m = re.search(r"\d+", str(level))
    return int(m.group(0)) if m else None


def _code(text):
    """MBPP code uses \\r\\n (and a few lone \\r): plain newlines, no trailing blank space."""
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\n").rstrip()


# --------------------------------------------------------------------------------------- prompts

ANSWER_CUE = "\n\nAnswer:\n"  # ends the prompt when the tokenizer has no chat template


def user_message(task, example):
    """The one zero-shot instruction per task, used for fine-tuning and for evaluation alike."""
    _check_task(task)
    if task == "gsm8k":
        return (f"{example['question']}\n\nSolve the problem step by step. Write the final answer "
                f"as a number on the last line, in the form \"#### <number>\".")
    if task == "math":
        return (f"{example['question']}\n\nSolve the problem step by step. Put the final answer "
                f"in \\boxed{{}}.")
    tests = "\n".join(example["tests"])  # the MBPP paper's wording
    return (f"You are an expert Python programmer, and here is your task: {example['question']} "
            f"Your code should pass these tests:\n\n{tests}")


def format_prompt(task, example, tokenizer):
    """Prompt text ending exactly where the answer starts: the chat template's assistant header
    when the tokenizer has one, else the message followed by ANSWER_CUE."""
    user = user_message(task, example)
    return tokenizer.chat_prompt(user) if tokenizer.has_chat_template else user + ANSWER_CUE


def encode_example(task, example, tokenizer, *, max_len):
    """{"input_ids", "labels", "truncated"} for fine-tuning, or None if the prompt alone fills max_len.

    input_ids = prompt ids + answer ids, where the answer is target + end_of_turn text, then EOS
    (once). labels equal input_ids with every prompt position set to IGNORE_INDEX: position i holds
    token i, and the loss shifts by one (predict labels[i + 1] from position i). Too long: the
    answer is cut from the right to fit max_len (and then has no EOS).
    """
    prompt = tokenizer.encode(format_prompt(task, example, tokenizer))
    answer = tokenizer.encode(example["target"] + tokenizer.end_of_turn, bos=False)
    if not answer or answer[-1] != tokenizer.eos_id:
        answer.append(tokenizer.eos_id)
    if len(prompt) >= max_len:
        return None
    truncated = len(prompt) + len(answer) > max_len
    answer = answer[:max_len - len(prompt)]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
            "truncated": truncated}


def build_examples(task, examples, tokenizer, *, max_len):
    """encode_example over a split -> (encoded, {"kept", "truncated", "dropped"})."""
    encoded, dropped = [], 0
    for ex in examples:
        e = encode_example(task, ex, tokenizer, max_len=max_len)
        if e is None:
            dropped += 1
        else:
            encoded.append(e)
    counts = {"kept": len(encoded), "truncated": sum(e["truncated"] for e in encoded),
              "dropped": dropped}
    return encoded, counts


def main():
    ap = argparse.ArgumentParser(description="Fetch MATH and MBPP (and GSM8K, which also ships with soka) "
                                             "into a data directory, each file checked by sha256.")
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--task", choices=TASKS, help="one task (default: all three)")
    ap.add_argument("--base-url", help="a mirror laid out like the data directory")
    ap.add_argument("--force", action="store_true", help="fetch even if a checked copy is there")
    args = ap.parse_args()
    try:
        paths = download(args.task, data_dir=args.data_dir, base_url=args.base_url, force=args.force)
    except (OSError, ValueError, tarfile.TarError) as e:     # offline, a bad digest, a broken tarball
        raise SystemExit(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    for path in paths:
        print(f"{file_sha256(path)}  {path}")


if __name__ == "__main__":
    main()
