"""mbpp_run: run model-written Python against MBPP's asserts in a locked-down child process.

    mbpp_run("def add(a, b):\\n    return a + b", ["assert add(1, 2) == 3"])    # True
    run_many([(code, tests, setup_code), ...], timeout=10.0)  # -> [RunResult], in parallel

The verdict. The harness opens a pipe and hands its write end to the child; after the last assert
the child writes a random token (read from a file it deletes before the model's code runs) to that
pipe. Only that exact token counts as a pass: not the exit status (`sys.exit(0)` and `os._exit(0)`
fail), not stdout (which the program may print to, or close).

The child:
  - is `python -S -E -B -u` (given the parent's sys.path) started with setsid(), so it leads its own
    process group, killed as a group at the deadline (or as soon as the token arrives);
  - runs in a fresh temporary directory (also its HOME and TMPDIR), removed afterwards;
  - has stdin on /dev/null, stdout and stderr captured to `output_limit` bytes (the rest drained
    and dropped), and an environment of PATH, HOME, TMPDIR, LANG and one-thread BLAS settings;
  - has limits on address space (`memory_mb`), CPU seconds (timeout + 1), file size (16 MiB), core
    files (0) and processes (0 new ones, threads included; the kernel ignores this for root);
  - under Landlock (Linux >= 5.13, most distribution kernels): the kernel refuses to create, write,
    truncate, rename or delete any file outside the temporary directory (and /dev/null), and from
    ABI 4 on to open TCP connections, from ABI 6 on to signal processes outside the sandbox;
  - in Python: os.remove/unlink/rmdir/rename/replace/chmod/chown/kill/fork/system/exec*/spawn*,
    shutil.rmtree/move, subprocess.* and resource.setrlimit raise PermissionError, and open(),
    io.open, os.open and os.mkdir refuse to write outside the temporary directory.
The Python layer stops accidents, not an adversary (ctypes or `_io.FileIO` get around it); the
Landlock layer is enforced by the kernel. `landlock_abi()` says whether this kernel has it.
"""
import marshal
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm import tqdm

MEMORY_MB = 1024        # address-space limit of one run (virtual memory, so generous)
OUTPUT_LIMIT = 64 << 10  # bytes of stdout + stderr kept per run
FILE_LIMIT = 16 << 20    # largest file a run may write, bytes

# The child's program. It reads its job, locks itself down (Landlock, rlimits, Python guards), runs
# the solution, the setup code and each assert in one namespace, then writes the token to fd argv[1].
_RUNNER = r'''
import builtins, marshal, os, resource, sys

def landlock(root):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syscall
        call.restype = ctypes.c_long
        abi = call(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # landlock_create_ruleset
        if abi < 1:
            return 0
        write_file, truncate = 1 << 1, (1 << 14 if abi >= 3 else 0)
        # write, remove dir/file, make char/dir/reg/sock/fifo/block/sym, refer (abi 2), truncate
        rights = write_file | (1 << 4) | (1 << 5) | (0x7F << 6) | (1 << 13 if abi >= 2 else 0) | truncate
        attr = (ctypes.c_uint64 * 3)(rights, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        ruleset = call(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if ruleset < 0:
            return 0

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        for path, allowed in ((root, rights), (os.devnull, write_file | truncate)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = PathBeneath(allowed, fd)
            added = call(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
                         ctypes.c_uint32(0))
            os.close(fd)
            if added != 0:
                return 0
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, required to restrict without privileges
        return abi if call(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0 else 0
    except Exception:
        return 0

def limits(job):
    for name, soft, hard in (("RLIMIT_AS", job["memory"], job["memory"]),
                             ("RLIMIT_CPU", job["cpu"], job["cpu"] + 1),
                             ("RLIMIT_FSIZE", job["fsize"], job["fsize"]),
                             ("RLIMIT_CORE", 0, 0), ("RLIMIT_NPROC", 0, 0)):
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError):
            pass

def guard(root):
    import io, shutil, subprocess

    def disabled(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return refuse

    for name in ("system popen kill killpg fork forkpty setsid setpgid setpgrp setuid setgid "
                 "seteuid setegid setreuid setregid setresuid setresgid remove unlink rmdir "
                 "removedirs rename renames replace truncate chmod fchmod lchmod chown fchown "
                 "lchown chroot chdir fchdir link symlink mkfifo mknod execv execve execl "
                 " execle execlp execlpe execvp execvpe spawnl spawnle spawnlp spawnlpe spawnv "
                 "spawnve spawnvp spawnvpe posix_spawn posix_spawnp plock").split():
        if hasattr(os, name):
            setattr(os, name, disabled("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, disabled("shutil." + name))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput",
                 "getstatusoutput"):
        setattr(subprocess, name, disabled("subprocess." + name))
    resource.setrlimit = disabled("resource.setrlimit")

    def inside(path):
        path = os.path.realpath(os.path.join(root, os.fsdecode(os.fspath(path))))
        return path == root or path.startswith(root + os.sep) or path == os.devnull

    def check(path, what):
        if not inside(path):
            raise PermissionError(f"sandbox: {what} outside the sandbox directory: {path!r}")

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set(mode) & set("wax+"):
            check(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & writing:
            check(path, "writing")
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        check(path, "mkdir")
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = open_
    os.open, os.mkdir = os_open, mkdir

def main():
    verdict_fd, write = int(sys.argv[1]), os.write
    with open("job", "rb") as f:
        job = marshal.load(f)
    os.remove("job")
    token = job.pop("token").encode()
    sys.path[:] = job["path"]
    root = os.path.realpath(os.getcwd())
    landlock(root)
    limits(job)
    guard(root)
    scope = {"__name__": "__sandbox__", "__builtins__": builtins}
    exec(compile(job["code"], "solution.py", "exec"), scope)
    exec(compile(job["setup"], "setup.py", "exec"), scope)  # after the code: it may use its classes
    for k, test in enumerate(job["tests"]):
        exec(compile(test, f"test_{k}.py", "exec"), scope)
    write(verdict_fd, token)

main()
'''


@dataclass
class RunResult:
    passed: bool
    status: str              # "passed", "failed" (ended without the token) or "timeout"
    returncode: int | None   # negative: killed by that signal (-9 at the deadline, -24 CPU limit)
    seconds: float
    output: str              # the first output_limit bytes of stdout + stderr


def run_program(code, tests, setup_code="", *, timeout=10.0, memory_mb=MEMORY_MB,
                output_limit=OUTPUT_LIMIT):
    """Run `setup_code`, `code`, then each assert in `tests`, sandboxed as the module docstring says."""
    root = tempfile.mkdtemp(prefix="soka-sandbox-")
    token = secrets.token_hex(16)
    job = {"token": token, "setup": setup_code or "", "code": code, "tests": list(tests),
           "path": [p for p in sys.path if p and os.path.isabs(p)],
           "memory": memory_mb << 20, "cpu": math.ceil(timeout) + 1, "fsize": FILE_LIMIT}
    env = {"PATH": os.defpath, "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    read_fd = None
    try:
        with open(os.path.join(root, "job"), "wb") as f:
            marshal.dump(job, f)
        read_fd, write_fd = os.pipe()
        start = time.monotonic()
        try:
            proc = subprocess.Popen([sys.executable, "-S", "-E", "-B", "-u", "-c", _RUNNER,
                                     str(write_fd)], cwd=root, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)  # the child holds the only write end now
        passed, timed_out, output = _collect(proc, read_fd, token.encode(), start + timeout,
                                             output_limit)
        seconds = time.monotonic() - start
    finally:
        if read_fd is not None:
            os.close(read_fd)
        shutil.rmtree(root, ignore_errors=True)
    status = "passed" if passed else "timeout" if timed_out else "failed"
    return RunResult(passed, status, proc.returncode, seconds,
                     output.decode("utf-8", errors="replace"))


def _collect(proc, verdict_fd, token, deadline, output_limit):
    """Read output and verdict until both pipes close, the token arrives or the deadline passes;
    then kill the whole process group (before reaping, so the group id cannot be reused)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "output")
    sel.register(verdict_fd, selectors.EVENT_READ, "verdict")
    output, verdict, timed_out = bytearray(), b"", False
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(left):
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                sel.unregister(key.fileobj)
            elif key.data == "verdict":
                verdict = (verdict + chunk)[:len(token) + 1]
            elif len(output) < output_limit:
                output += chunk[:output_limit - len(output)]
        if verdict == token:
            break
    sel.close()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.stdout.close()
    return verdict == token, timed_out and verdict != token, bytes(output)


def mbpp_run(code, tests, setup_code="", timeout=10.0):
    """True iff every assert in `tests` passed after `setup_code` and `code`, sandboxed."""
    return run_program(code, tests, setup_code, timeout=timeout).passed


def run_many(jobs, *, timeout=10.0, workers=None, progress=False, **options):
    """`run_program` over (code, tests[, setup_code]) tuples, `workers` at a time (default: CPUs).

    Threads only wait on their children, so the children are the parallelism.
    """
    jobs = [tuple(job) for job in jobs]
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(run_program, *job, timeout=timeout, **options) for job in jobs]
        for _ in tqdm(as_completed(futures), total=len(futures), desc="mbpp", unit="program", disable=not progress):
            pass
        return [f.result() for f in futures]


def landlock_abi():
    """The kernel's Landlock ABI version (0: none), so callers can say which guarantees hold."""
    try:
        import ctypes
        call = ctypes.CDLL(None, use_errno=True).syscall
        call.restype = ctypes.c_long
        return max(0, call(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
    except (OSError, AttributeError):
        return 0
