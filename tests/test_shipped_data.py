"""GSM8K ships with soka (soka/data/gsm8k, xz): read when the data directory has no copy, checked by
sha256, overridden by the user's own file; and the offline messages say what to do."""
import hashlib
import lzma
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from soka import tasks  # noqa: E402


def test_the_shipped_files_are_the_originals():
    for f in tasks.FILES["gsm8k"]:
        data = lzma.decompress((tasks.SHIPPED / f"{f.path}.xz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == f.sha256
    assert "MIT License" in (tasks.SHIPPED / "gsm8k" / "LICENSE").read_text()


def test_an_empty_data_directory_reads_the_shipped_copy(tmp_path):
    train = tasks.load_examples("gsm8k", "train", data_dir=tmp_path)
    test = tasks.load_examples("gsm8k", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0]["id"] == "test/0" and test[0]["gold"] == "18"       # Janet's ducks
    assert tasks.data_file("gsm8k", "test", tmp_path) == tasks.SHIPPED / "gsm8k" / "test.jsonl.xz"
    assert not any(tmp_path.iterdir())                                # nothing written


def test_the_users_file_wins(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "1 + 1?", "answer": "2\\n#### 2"}\n')
    rows = tasks.load_examples("gsm8k", "test", data_dir=tmp_path)
    assert [r["question"] for r in rows] == ["1 + 1?"]
    assert tasks.data_file("gsm8k", "test", tmp_path) == tmp_path / "gsm8k" / "test.jsonl"


def test_a_damaged_shipped_copy_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    good = lzma.decompress((tasks.SHIPPED / "gsm8k" / "test.jsonl.xz").read_bytes())
    (tmp_path / "gsm8k" / "test.jsonl.xz").write_bytes(lzma.compress(good.replace(b"Janet", b"Jane ", 1)))
    monkeypatch.setattr(tasks, "SHIPPED", tmp_path)
    with pytest.raises(ValueError, match="the shipped copy is damaged") as e:
        tasks.load_examples("gsm8k", "test", data_dir=tmp_path / "empty")
    assert "\n" not in str(e.value)


def test_download_writes_gsm8k_from_the_shipped_copy_without_the_network(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("fetched from the network")
    monkeypatch.setattr(tasks.urllib.request, "urlopen", no_network)
    paths = tasks.download("gsm8k", data_dir=tmp_path, progress=False)
    for path, f in zip(paths, tasks.FILES["gsm8k"]):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == f.sha256


def test_the_fetch_command_fails_offline_in_one_line_naming_data_dir(tmp_path):
    """A mirror that refuses connections stands for no network."""
    p = subprocess.run([sys.executable, "-m", "soka.tasks", "--data-dir", str(tmp_path), "--task", "mbpp",
                        "--base-url", "http://127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not fetch" in lines[0] and "--data-dir" in lines[0], p.stderr
    assert str(tmp_path / "mbpp" / "mbpp.jsonl") in lines[0]


def test_a_missing_file_without_download_names_the_fetch_command_and_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        tasks.load_examples("math", "math500", data_dir=tmp_path)
    msg = str(e.value)
    assert "python -m soka.tasks" in msg and "--data-dir" in msg and "math/math500.jsonl" in msg
