"""Files written whole. Each file goes to a temporary name beside its own, is flushed to disk, and is
then renamed into place, so no reader ever sees half a file. Files that belong together (eval.json
and eval.jsonl, a checkpoint's weights and its config) are renamed together with Ctrl-C held off for
the few microseconds that takes: an interruption leaves the old set or the new one, never a mix, and
no temporary file.
"""
import contextlib
import json
import os
import signal
import threading
from pathlib import Path


def replace_files(writers, *, remove=()):
    """writers: {path: write}, write(tmp) writing the file at the path tmp. All are written first;
    then they are renamed into place and the paths in `remove` deleted. An error or interruption
    while writing leaves every path as it was."""
    tmps = {}
    try:
        for path, write in writers.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
            tmps[tmp] = path
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        with _sigint_held():
            for tmp, path in tmps.items():
                os.replace(tmp, path)
            for path in remove:
                Path(path).unlink(missing_ok=True)
    finally:
        for tmp in tmps:                   # gone after a rename; left only by an error or Ctrl-C
            tmp.unlink(missing_ok=True)


def write_json(path, obj):
    replace_files({path: lambda p: p.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n",
                                                encoding="utf-8")})


def json_lines(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@contextlib.contextmanager
def _sigint_held():
    """Ctrl-C is recorded, not raised, inside the block; the handler it would have run runs after."""
    if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])
