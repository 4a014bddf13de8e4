"""Files written whole. Each file goes to a temporary name beside its own (".name.part"), its bytes
are synced to disk, and it is then renamed into place, so no reader ever sees half a file. Files
that belong together (eval.json and eval.jsonl, a checkpoint's weights and its config) are renamed
together with Ctrl-C held off for the few microseconds that takes: an error or Ctrl-C leaves the old
set or the new one, never a mix, and no temporary file. (A process killed outright can leave a
temporary file; the next write of the same name replaces it.)
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
            tmp = path.with_name(f".{path.name}.part")
            tmps[tmp] = path
            write(tmp)
            with open(tmp, "rb") as f:     # fsync wants a descriptor; reading one is enough on Linux
                os.fsync(f.fileno())
        with _sigint_held():
            for tmp, path in tmps.items():
                os.replace(tmp, path)
            for path in remove:
                Path(path).unlink(missing_ok=True)
    finally:
        for tmp in tmps:                   # gone after a rename; left only by an error or Ctrl-C
            tmp.unlink(missing_ok=True)


def json_text(obj):
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def json_lines(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_json(path, obj):
    replace_files({path: lambda p: p.write_text(json_text(obj), encoding="utf-8")})


@contextlib.contextmanager
def _sigint_held():
    """Ctrl-C is recorded, not acted on, inside the block; each press is sent again after it, to the
    handler that was there before (Python's KeyboardInterrupt, or train.py's stop request)."""
    if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for _ in caught:
            signal.raise_signal(signal.SIGINT)
