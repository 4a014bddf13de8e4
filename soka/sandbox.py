"""mbpp_run: run model-written Python against MBPP's asserts; the verdict is decided outside the sandbox.

    mbpp_run("def add(a, b):\\n    return a + b", ["assert add(1, 2) == 3"])    # True
    run_many([(code, tests, setup_code), ...], timeout=10.0)  # -> [RunResult], in parallel

The verdict. Each assert is parsed here, in the harness, with `ast` and split into the program's side
("probes": `add(1, 2)`, run in the sandbox) and the expected side (`3`, evaluated here over literals
and a few genuine builtins such as set(), sorted(), float('inf'), math.*, sys.getsizeof). The
sandbox sends back only plain data (JSON of numbers, strings, lists, tuples, sets, dicts, bytes,
None, bools, tagged so they round-trip); the comparison, `not`, `and`/`or`, math.isclose are
applied here. Nothing in the sandboxed process decides the verdict, and the expected values never
enter it. A custom object, function or generator is not data: in a comparison it fails; as a bare
truth test (`assert f(x)`, `assert not f(x)`) it counts as its truth value, one bit the program
could return directly. An assert that cannot be split this way fails (never runs); an empty test
list raises ValueError. docs/tasks.md lists the forms and the guarantees' limits.

The sandbox (each layer where the machine allows it; RunResult.protections says which were active):
  - a launcher (`python -S -E -B -u`, minimal environment, stdin /dev/null, stdout+stderr captured
    to `output_limit` bytes) unshares network, PID, mount, IPC and UTS namespaces (plus a user
    namespace when not root) and forks the program as PID 1 of the new PID namespace: when it
    ends or is killed (it dies with the launcher), the kernel kills every process left in it;
  - the program gets a fresh /proc (the harness is invisible), an empty size-limited tmpfs as its
    folder (`disk_mb`), empty /tmp, /var/tmp and /dev/shm; as root it becomes nobody (65534), with
    folders that nobody cannot reach (e.g. a Python under /root) bound in read-only; otherwise
    all capabilities are dropped;
  - no_new_privs, Landlock (no writes outside its folder, no TCP, no signals or abstract sockets
    out of the sandbox), a seccomp filter (no socket(), fork, clone, unshare, mount, ptrace,
    io_uring, bpf, memfd ...), rlimits (address space `memory_mb`, CPU timeout + 1 s, 16 MiB per
    file, no core, 0 processes, 64 files), then Python guards against accidents (os.remove,
    subprocess, writes outside the folder ...);
  - the harness kills it at the deadline (`timeout`, wall clock, for the whole run) or as soon as
    the verdict is known, waits until it is gone, and removes its folder (immutable flags cleared).
"""
import ast
import builtins
import cmath
import json
import marshal
import math
import operator
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from tqdm import tqdm

MEMORY_MB = 1024         # address-space limit of the run (one process; virtual memory, so generous)
DISK_MB = 64             # size of the run's folder (a tmpfs), or the most it may hold (checked)
OUTPUT_LIMIT = 64 << 10  # bytes of stdout + stderr kept per run
FILE_LIMIT = 16 << 20    # largest file a run may write, bytes
RESULT_LIMIT = 1 << 20   # most bytes of probe values a run may send back (decoded, up to about 50×)
NOBODY = 65534

# The child's program. The launcher (P0) reads its job from stdin, unshares namespaces and forks the
# program (P1), which confines itself, runs the solution and setup code, evaluates each test's
# probes and writes one JSON line per test to fd argv[1].
_RUNNER = r'''
import builtins, ctypes, marshal, os, resource, select, signal, sys

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
NOBODY = 65534
NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18


def prctl(*args):
    args = list(args) + [0] * (5 - len(args))
    return LIBC.prctl(*[ctypes.c_ulong(a) for a in args])


def mount(source, target, fstype, flags, data=None):
    b = lambda s: None if s is None else os.fsencode(s)
    if LIBC.mount(b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def put(path, text):
    with open(path, "w") as f:
        f.write(text)


def namespaces():
    """The launcher: new network, PID, mount, IPC and UTS namespaces (in a new user namespace when
    not root); where all at once fail, each one that works."""
    uid, gid = os.geteuid(), os.getegid()
    names = ((NEWNET, "netns"), (NEWPID, "pidns"), (NEWNS, "mountns"), (NEWIPC, "ipcns"), (NEWUTS, "utsns"))
    every = sum(flag for flag, _ in names)
    if uid != 0:
        if LIBC.unshare(NEWUSER | every) != 0:
            return set()
        try:
            put("/proc/self/setgroups", "deny")
            put("/proc/self/uid_map", f"{uid} {uid} 1")
            put("/proc/self/gid_map", f"{gid} {gid} 1")
        except OSError:
            pass
        return {"userns"} | {name for _, name in names}
    if LIBC.unshare(every) == 0:
        return {name for _, name in names}
    return {name for flag, name in names if LIBC.unshare(flag) == 0}


def under(path, folder):
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def blocked_ancestor(path):
    """The first folder on the way to `path` that others (nobody) may not enter, or None."""
    cur = "/"
    for part in [p for p in path.split("/") if p]:
        if not os.stat(cur).st_mode & 0o001:
            return cur
        cur = os.path.join(cur, part)
    return None


def readable_by_others(path):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True                      # absent: nothing to read
    want = 0o005 if os.path.isdir(path) else 0o004
    return blocked_ancestor(path) is None and mode & want == want


def overlay(folders, keep):
    """An empty tmpfs over each of `folders`; the paths of `keep` beneath one bound back, read-only."""
    keep = sorted(p for p in keep if os.path.exists(p) and any(under(p, f) for f in folders))
    bound = []
    for p in keep:
        if not any(under(p, q) for q in bound):
            bound.append(p)
    fds = [(p, os.open(p, os.O_PATH | os.O_CLOEXEC)) for p in bound]
    for f in folders:
        mode = "1777" if f in ("/tmp", "/var/tmp", "/dev/shm") else "0755"
        mount("tmpfs", f, "tmpfs", MS_NOSUID | MS_NODEV, f"size=1m,nr_inodes=1024,mode={mode}")
    for p, fd in fds:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(p, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
            open(p, "a").close()
        mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        try:
            mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        except OSError:
            pass
        os.close(fd)


def filesystem(job, have, to_nobody, prot):
    """Private mounts: /proc of the new PID namespace, empty /tmp, /var/tmp, /dev/shm, reachable
    Python folders for nobody, and the run's folder as a size-limited tmpfs. Returns whether the
    program can run as nobody (every folder on sys.path readable by others)."""
    root = job["root"]
    if "mountns" in have:
        try:
            mount(None, "/", None, MS_REC | MS_PRIVATE)
        except OSError:
            have.discard("mountns")
    if "mountns" not in have:
        to_nobody = to_nobody and all(readable_by_others(p) for p in job["path"])
        if to_nobody:
            os.chown(root, NOBODY, NOBODY)
        return to_nobody
    if "pidns" in have:
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            prot.append("private /proc")
        except OSError:
            pass
    folders = [f for f in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(f) and not os.path.islink(f)]
    if to_nobody:
        folders += [b for b in map(blocked_ancestor, job["path"] + [root]) if b]
    folders = sorted(set(folders))
    folders = [f for f in folders if not any(g != f and under(f, g) for g in folders)]
    try:
        overlay(folders, job["path"])
        prot.append("private /tmp")
    except OSError:
        pass
    to_nobody = to_nobody and all(readable_by_others(p) for p in job["path"])
    uid, gid = (NOBODY, NOBODY) if to_nobody else (os.geteuid(), os.getegid())
    os.makedirs(root, 0o700, exist_ok=True)
    try:
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"size={job['disk']},nr_inodes=4096,mode=0700,uid={uid},gid={gid}")
        prot.append(f"tmpfs {job['disk'] >> 20} MiB")
    except OSError:
        os.chown(root, uid, gid)
    return to_nobody


def capabilities():
    with open("/proc/self/status") as f:
        caps = dict(line.split(":", 1) for line in f if line.startswith("Cap"))
    return max(int(caps.get(k, "0").strip(), 16) for k in ("CapEff", "CapPrm", "CapAmb"))


def drop_privileges(to_nobody, prot):
    for cap in range(64):
        prctl(24, cap)                                   # PR_CAPBSET_DROP
    prctl(47, 4)                                         # PR_CAP_AMBIENT_CLEAR_ALL
    if to_nobody:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        prot.append("user nobody")
    else:
        if os.geteuid() == 0:
            prctl(28, 0xEF)                              # securebits: uid 0 never regains capabilities

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        LIBC.capset(ctypes.byref(Header(0x20080522, 0)), (ctypes.c_uint32 * 6)())
        prot.append(f"uid {os.geteuid()}")
    if capabilities() == 0:
        prot.append("no capabilities")


def landlock(root):
    """Writes only beneath `root` (and /dev/null); reads everywhere but in /proc, where only its own
    /proc/<pid> is readable; from ABI 4 no TCP bind/connect, from ABI 6 no signals or abstract Unix
    sockets out of the sandbox. Returns the ABI in force (0: none)."""
    try:
        call = LIBC.syscall
        abi = call(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # landlock_create_ruleset
        if abi < 1:
            return 0
        read_file, write_file, read_dir, truncate = 1 << 2, 1 << 1, 1 << 3, (1 << 14 if abi >= 3 else 0)
        # write, remove dir/file, make char/dir/reg/sock/fifo/block/sym, refer (abi 2), truncate
        rights = write_file | (1 << 4) | (1 << 5) | (0x7F << 6) | (1 << 13 if abi >= 2 else 0) | truncate
        handled = rights | read_file | read_dir
        attr = (ctypes.c_uint64 * 3)(handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        ruleset = call(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if ruleset < 0:
            return 0

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        rules = [(root, handled), (os.devnull, write_file | truncate | read_file), ("/proc/self", read_file | read_dir)]
        rules += [("/" + e, read_file | read_dir) for e in os.listdir("/") if e != "proc"]
        for path, allowed in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            if not os.path.isdir(f"/proc/self/fd/{fd}"):
                allowed &= ~read_dir & ~(1 << 4) & ~(1 << 5) & ~(0x7F << 6) & ~(1 << 13)
            added = call(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(PathBeneath(allowed, fd)),
                         ctypes.c_uint32(0))
            os.close(fd)
            if added != 0 and path in (root, os.devnull):
                return 0
        return abi if call(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0 else 0
    except Exception:
        return 0


DENY = {  # (audit arch, syscalls refused with EPERM, syscalls allowed only on itself: arg 0 == own pid or 0)
    "x86_64": (0xC000003E,
               [41, 57, 58, 56, 272, 308, 165, 166, 155, 161, 101, 310, 311, 321, 298, 323, 250, 248, 249,
                425, 426, 427, 428, 429, 430, 431, 432, 433, 442, 312, 438, 304, 303, 163, 103, 319, 447, 424],
               [62, 200, 234, 129, 297, 434, 302, 203]),
    "aarch64": (0xC00000B7,
                [198, 220, 97, 268, 40, 39, 41, 51, 117, 270, 271, 280, 241, 282, 219, 217, 218, 425, 426,
                 427, 428, 429, 430, 431, 432, 433, 442, 272, 438, 265, 264, 89, 116, 279, 447, 424],
                [129, 130, 131, 138, 240, 434, 261, 122]),
}


def seccomp():
    """Refused: socket, fork/vfork/clone (clone3: ENOSYS, so libc falls back to clone), unshare,
    setns, the mount APIs, chroot, ptrace, process_vm_*, bpf, perf_event_open, userfaultfd, keys,
    io_uring, kcmp, pidfd_getfd/send_signal, file handles, acct, syslog, memfd; kill, tkill,
    tgkill, rt_(tg)sigqueueinfo, pidfd_open, prlimit64, sched_setaffinity only on itself. A foreign
    architecture (e.g. int 0x80) kills the process."""
    machine = os.uname().machine
    if machine not in DENY:
        return False
    arch, deny, own = DENY[machine]
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
    ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
    code = [(LD, 4), (JEQ, arch, "nr", "kill"), ("nr",), (LD, 0)]   # (op, k[, jump if true, if false])
    if machine == "x86_64":
        code.append((JGE, 0x40000000, "eperm", None))                  # x32 system calls
    code.append((JEQ, 435, "enosys", None))
    code += [(JEQ, nr, "eperm", None) for nr in deny]
    code += [(JEQ, nr, "own", None) for nr in own]
    code += [(RET, ALLOW), ("own",), (LD, 16), (JEQ, os.getpid(), "allow", None), (JEQ, 0, "allow", None),
             ("eperm",), (RET, EPERM), ("kill",), (RET, KILL), ("enosys",), (RET, ENOSYS), ("allow",), (RET, ALLOW)]
    labels, rows = {}, []
    for item in code:
        if len(item) == 1:
            labels[item[0]] = len(rows)
        else:
            rows.append(item)
    prog = []
    for i, row in enumerate(rows):
        op, k = row[:2]
        jt, jf = ((labels[t] - i - 1 if t else 0) for t in (row[2:] + (None, None))[:2])
        prog.append((op, jt, jf, k))

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    table = (Filter * len(prog))(*[Filter(*row) for row in prog])
    program = Program(len(prog), table)
    return prctl(22, 2, ctypes.addressof(program)) == 0   # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def limits(job):
    done = True
    for name, soft, hard in (("RLIMIT_AS", job["memory"], job["memory"]),
                             ("RLIMIT_CPU", job["cpu"], job["cpu"] + 1),
                             ("RLIMIT_FSIZE", job["fsize"], job["fsize"]),
                             ("RLIMIT_CORE", 0, 0), ("RLIMIT_NPROC", 0, 0), ("RLIMIT_NOFILE", 64, 64),
                             ("RLIMIT_MSGQUEUE", 0, 0), ("RLIMIT_MEMLOCK", 0, 0)):
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError):
            done = False
    return done


def guard(root):
    """Python-level refusals: they stop accidents, not an adversary (the layers above do that)."""
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


def json_writer():
    """A JSON writer for what encoder() returns (None, bools, ints, finite floats, str, lists,
    one-key dicts); the json module would import re, 20 ms of every run's start."""
    escapes = {c: "\\u%04x" % c for c in list(range(0x20)) + [0x22, 0x5C] + list(range(0xD800, 0xE000))}
    int_, float_, str_, list_, dict_, type_, repr_ = int, float, str, list, dict, type, repr

    def dumps(x):
        t = type_(x)
        if x is None:
            return "null"
        if x is True or x is False:
            return "true" if x else "false"
        if t is int_:
            return repr_(x)
        if t is float_:
            return repr_(x)
        if t is str_:
            return '"' + x.translate(escapes) + '"'
        if t is list_:
            return "[" + ",".join([dumps(v) for v in x]) + "]"
        if t is dict_:
            return "{" + ",".join([dumps(k) + ":" + dumps(v) for k, v in x.items()]) + "}"
        raise TypeError(t.__name__)
    return dumps


def encoder():
    """Plain data -> tagged JSON-able values; anything else raises TypeError."""
    isinstance_, type_, len_, int_, float_, str_, repr_ = isinstance, type, len, int, float, str, repr
    tuple_, list_, bytes_, bytearray_, sorted_ = tuple, list, bytes, bytearray, sorted
    finite = __import__("math").isfinite

    def f(x):
        x = float_.__float__(x) if type_(x) is not float_ else x
        return x if finite(x) else {"f": repr_(x)}

    def enc(v, depth=0):
        if depth > 100:
            raise TypeError("nested too deeply")
        if v is None or v is True or v is False:
            return v
        if isinstance_(v, int_):
            v = int_.__index__(v)
            return v if -(1 << 63) < v < (1 << 63) else {"i": hex(v)}
        if isinstance_(v, float_):
            return f(v)
        if isinstance_(v, str_):
            return str_.__str__(v)
        if isinstance_(v, complex):
            return {"c": [f(complex.__getattribute__(v, "real")), f(complex.__getattribute__(v, "imag"))]}
        if isinstance_(v, (bytes_, bytearray_)):
            return {"ba" if isinstance_(v, bytearray_) else "b": bytes_(v).hex()}
        d = depth + 1
        if isinstance_(v, list_):
            return [enc(x, d) for x in list_.__iter__(v)]
        if isinstance_(v, tuple_):
            return {"t": [enc(x, d) for x in tuple_.__iter__(v)]}
        if isinstance_(v, (set, frozenset)):
            return {"fs" if isinstance_(v, frozenset) else "s": [enc(x, d) for x in list_(v)]}
        if isinstance_(v, dict):
            return {"d": [[enc(k, d), enc(x, d)] for k, x in dict.items(v)]}
        if type_(v) is range:
            return {"r": [v.start, v.stop, v.step]}
        fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
        if fractions and isinstance_(v, fractions.Fraction):
            return {"q": [enc(v.numerator), enc(v.denominator)]}
        if decimal and isinstance_(v, decimal.Decimal):
            return {"m": str_(v)}
        raise TypeError(type_(v).__name__)
    return enc


def program(job, result_fd):
    """The program's side: solution, setup, then each test's probes, one JSON line per test."""
    write, dumps, compile_, eval_, exec_, enc = os.write, json_writer(), compile, eval, exec, encoder()
    isinstance_, type_, str_, bool_ = isinstance, type, str, bool
    module_type = type(sys)

    def send(obj):
        data = (dumps(obj) + "\n").encode("utf-8", "surrogatepass")
        view = memoryview(data)
        while view:
            view = view[write(result_fd, view):]

    scope = {"__name__": "__sandbox__", "__builtins__": builtins}
    exec_(compile_(job["code"], "solution.py", "exec"), scope)
    exec_(compile_(job["setup"], "setup.py", "exec"), scope)  # after the code: it may use its classes
    for k, test in enumerate(job["tests"]):
        values = []
        for src, truth in test["probes"]:
            try:
                v = eval_(compile_(src, f"test_{k}.py", "eval"), scope)
            except BaseException as e:
                values.append(["err", str_(type_(e).__name__)[:100]])
                continue
            try:
                values.append(["ok", enc(v)])
            except BaseException as e:
                if not truth:
                    values.append(["bad", str_(type_(v).__name__)[:100]])
                    continue
                try:
                    values.append(["truth", True if v else False])
                except BaseException as e:
                    values.append(["err", str_(type_(e).__name__)[:100]])
        names = {}
        for name in test["names"]:
            m = scope.get(name, None)
            names[name] = "module" if isinstance_(m, module_type) and m.__name__ == name else "other"
        send({"k": k, "v": values, "n": names})


def child(job, result_fd, alive_r, have):
    # as root: nobody, unless nobody could not read Python's folders (then uid 0 without capabilities)
    prot = []
    to_nobody = filesystem(job, have, os.geteuid() == 0 and "userns" not in have, prot)
    prot[:0] = sorted(have - {"userns"})
    os.chdir(job["root"])
    drop_privileges(to_nobody, prot)
    prctl(1, signal.SIGKILL)                     # PR_SET_PDEATHSIG: dies with the launcher
    if select.select([alive_r], [], [], 0)[0]:   # the launcher died before that
        os._exit(111)
    os.close(alive_r)
    prctl(38, 1)                                 # PR_SET_NO_NEW_PRIVS
    abi = landlock(os.path.realpath(os.getcwd()))
    if abi:
        prot.append(f"landlock {abi}")
    if seccomp():
        prot.append("seccomp")
    if limits(job):
        prot.append("rlimits")
    os.write(result_fd, (json_writer()({"p": prot}) + "\n").encode())
    guard(os.path.realpath(os.getcwd()))
    program(job, result_fd)


def main():
    result_fd = int(sys.argv[1])
    job = marshal.loads(sys.stdin.buffer.read())
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    prctl(1, signal.SIGKILL)                     # the launcher dies with the harness
    if os.getppid() != job["harness"]:
        os._exit(111)
    sys.path[:] = job["path"]
    have = namespaces()
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(alive_w)
            child(job, result_fd, alive_r, have)
        except BaseException as e:
            code = 0 if isinstance(e, SystemExit) and not e.code else 1
            if not isinstance(e, SystemExit):
                sys.excepthook(*sys.exc_info())     # C traceback printer: no import needed
        finally:
            os._exit(code)
    os.close(result_fd)
    os.close(alive_r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)

main()
'''


@dataclass
class RunResult:
    passed: bool
    status: str              # "passed", "failed" (a test false, or ended early) or "timeout"
    returncode: int | None   # of the launcher; negative: killed by that signal (-9 at the end)
    seconds: float
    output: str              # the first output_limit bytes of stdout + stderr
    protections: list = field(default_factory=list)  # the layers that were active (module docstring)
    detail: str = ""         # why it failed, or what went wrong around the run


# --------------------------------------------------------------------------------------------------
# The verdict: asserts split into probes (run in the sandbox) and expected sides (evaluated here).

class Undecomposable(ValueError):
    """An assert whose verdict could not be decided outside the sandbox: the run fails."""


class _Fail(Exception):
    pass


_FUNCS = {name: getattr(builtins, name) for name in
          "abs all any bool complex dict divmod float frozenset int len list max min pow range "
          "reversed round set sorted str sum tuple".split()}
_MODULES = {"math": (math, {n for n in dir(math) if not n.startswith("_")}),
            "cmath": (cmath, {n for n in dir(cmath) if not n.startswith("_")}),
            "sys": (sys, {"getsizeof", "maxsize"})}
_PREDICATES = {("math", "isclose"), ("cmath", "isclose")}
_VERDICT_CALLS = {"isclose", "eval", "exec", "compile", "__eq__", "__ne__", "__lt__", "__le__", "__gt__",
                  "__ge__", "__contains__"}
_OPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
        ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitAnd: operator.and_,
           ast.BitOr: operator.or_, ast.BitXor: operator.xor}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert}
_BIG = 10 ** 6   # the expected-side evaluator's bound on sizes (tests are trusted; this stops typos)


def _is_program(node, bound=frozenset()):
    """Does `node` read a name of the program's (neither a harness builtin/module nor bound inside)?"""
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id not in _FUNCS and n.id not in _MODULES and n.id not in bound:
            return True
        if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in _MODULES
                and n.attr not in _MODULES[n.value.id][1]):
            return True
    return False


def _bound_inside(node):
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.comprehension):
            names |= {t.id for t in ast.walk(n.target) if isinstance(t, ast.Name)}
        elif isinstance(n, ast.Lambda):
            a = n.args
            names |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
        elif isinstance(n, ast.NamedExpr):
            names.add(n.target.id)
    return names


def _pure(node):
    """Evaluate an expected side: literals, containers, arithmetic, comparisons, and calls of the
    genuine builtins in _FUNCS and of math/cmath/sys.getsizeof; anything else is Undecomposable."""
    if isinstance(node, ast.Constant):
        if node.value is Ellipsis:
            raise Undecomposable("... on the expected side")
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        if any(isinstance(e, ast.Starred) for e in node.elts):
            raise Undecomposable("a starred element on the expected side")
        items = [_pure(e) for e in node.elts]
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise Undecomposable("** in a dict on the expected side")
        return {_pure(k): _pure(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_pure(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _pure(node.left), _pure(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and abs(b) > 10000:
            raise ValueError("exponent too large")
        if isinstance(node.op, ast.LShift) and isinstance(b, int) and b > 100000:
            raise ValueError("shift too large")
        if isinstance(node.op, ast.Mult) and any(isinstance(x, (str, bytes, list, tuple)) for x in (a, b)):
            n, seq = (b, a) if isinstance(b, int) else (a, b)
            if isinstance(n, int) and n * len(seq) > _BIG:
                raise ValueError("sequence too long")
        return _BINOPS[type(node.op)](a, b)
    if isinstance(node, ast.BoolOp):
        value = None
        for v in node.values:
            value = _pure(v)
            if bool(value) == isinstance(node.op, ast.Or):
                return value
        return value
    if isinstance(node, ast.Compare):
        left = _pure(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            right = _pure(right_node)
            if not _OPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _pure(node.body) if _pure(node.test) else _pure(node.orelse)
    if isinstance(node, ast.Subscript):
        return _pure(node.value)[_pure(node.slice)]
    if isinstance(node, ast.Slice):
        return slice(*(None if x is None else _pure(x) for x in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Name) and node.id in _FUNCS:
        return _FUNCS[node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in _MODULES:
        module, allowed = _MODULES[node.value.id]
        if node.attr in allowed:
            return getattr(module, node.attr)
    if isinstance(node, ast.Call) and not any(isinstance(a, ast.Starred) for a in node.args) \
            and all(k.arg for k in node.keywords):
        func = _pure(node.func)
        if callable(func):
            args = [_pure(a) for a in node.args]
            if func is range and len(range(*args)) > _BIG:
                raise ValueError("range too long")
            return func(*args, **{k.arg: _pure(k.value) for k in node.keywords})
    raise Undecomposable(f"{type(node).__name__} on the expected side: {ast.unparse(node)}")


class _Plan:
    """One assert: `tree` over ("probe", i, truth), ("value", ok, v), ("not", n), ("and"|"or", [n]),
    ("cmp", [n], [op]), ("call", func, [n], {kw: n}); `probes` [(source, truth)] run in the sandbox,
    `names` the modules the expected side uses, which must be bound in the program's namespace."""

    def __init__(self, test):
        self.test, self.probes, self.names = test, [], set()
        try:
            body = ast.parse(test).body
        except SyntaxError as e:
            raise Undecomposable(f"a syntax error in the test: {e.msg}") from None
        if len(body) != 1 or not isinstance(body[0], ast.Assert):
            raise Undecomposable("not a single assert statement")
        self.tree = self._truth(body[0].test)       # the assert's message is never evaluated

    def _probe(self, node, truth):
        bound = _bound_inside(node)
        for n in ast.walk(node):
            if isinstance(n, ast.Compare) and any(_is_program(x, bound) for x in [n.left] + n.comparators):
                raise Undecomposable(f"a comparison inside the program's side: {ast.unparse(n)}")
            if isinstance(n, ast.Call):
                name = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                if name in _VERDICT_CALLS:
                    raise Undecomposable(f"{name}() inside the program's side: {ast.unparse(n)}")
        self.probes.append((ast.unparse(node), truth))
        return ("probe", len(self.probes) - 1, truth)

    def _expected(self, node):
        self.names |= {n.value.id for n in ast.walk(node) if isinstance(n, ast.Attribute)
                       and isinstance(n.value, ast.Name) and n.value.id in _MODULES}
        try:
            return ("value", True, _pure(node))
        except Undecomposable:
            raise
        except Exception as e:                      # e.g. 1/0: the assert raises, so it fails
            return ("value", False, f"{type(e).__name__}: {e}")

    def _operands(self, nodes):
        """Program-side operands become probes, the others expected values; at least one of each
        kind unless none reads any name (then all are expected: `assert 1 == 1`)."""
        program = [_is_program(n) for n in nodes]
        if not any(program) and _names(nodes[0]):
            program[0] = True                           # `sum(10, 15) == 6`: the program's own sum
        if all(program):
            raise Undecomposable("no side of the comparison is independent of the program")
        return [self._probe(n, False) if p else self._expected(n) for n, p in zip(nodes, program)]

    def _truth(self, node):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ("not", self._truth(node.operand))
        if isinstance(node, ast.BoolOp):
            return ("and" if isinstance(node.op, ast.And) else "or", [self._truth(v) for v in node.values])
        if isinstance(node, ast.Compare):
            for op, a, b in zip(node.ops, [node.left] + node.comparators, node.comparators):
                if isinstance(op, (ast.Is, ast.IsNot)) and not any(
                        isinstance(x, ast.Constant) and x.value in (None, True, False) and type(x.value) in
                        (type(None), bool) for x in (a, b)):
                    raise Undecomposable("`is` with something other than None, True or False")
            return ("cmp", self._operands([node.left] + node.comparators), [type(op) for op in node.ops])
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and (node.func.value.id, node.func.attr) in _PREDICATES):
            if any(isinstance(a, ast.Starred) for a in node.args) or not all(k.arg for k in node.keywords):
                raise Undecomposable("* or ** in a predicate call")
            module = node.func.value.id
            self.names.add(module)
            args = self._operands(node.args)
            kw = {k.arg: (self._probe(k.value, False) if _is_program(k.value) else self._expected(k.value))
                  for k in node.keywords}
            return ("call", getattr(_MODULES[module][0], node.func.attr), args, kw)
        if _names(node):
            return self._probe(node, True)
        return self._expected(node)


def _names(node):
    return any(isinstance(n, ast.Name) for n in ast.walk(node))


def plan(test):
    """The split of one assert (raises Undecomposable): for tests and the curious."""
    return _Plan(test)


def _unique_hashes(keys):
    """Keys for a set or dict, at most 32 of them sharing any one hash. A program could send keys
    chosen to share one hash (the ints k·(2⁶¹ − 1) all hash to 0): each insertion would then scan all
    the others, and building the set would take hours. Real values share few: hash(-1) == hash(-2)."""
    keys = list(keys)
    if len(keys) > 32:
        shared = max(Counter(map(hash, keys)).values())
        if shared > 32:
            raise ValueError(f"{shared} of {len(keys)} keys share one hash")
    return keys


def _decode(x, depth=0):
    """Tagged JSON -> genuine builtin values; anything else raises."""
    if depth > 200:
        raise ValueError("nested too deeply")
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return [_decode(v, depth + 1) for v in x]
    if type(x) is not dict or len(x) != 1:
        raise ValueError("not a tagged value")
    (tag, v), = x.items()
    d = depth + 1
    if tag == "t" and type(v) is list:
        return tuple(_decode(e, d) for e in v)
    if tag in ("s", "fs") and type(v) is list:
        return (set if tag == "s" else frozenset)(_unique_hashes(_decode(e, d) for e in v))
    if tag == "d" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
        keys = _unique_hashes(_decode(k, d) for k, _ in v)
        return dict(zip(keys, (_decode(e, d) for _, e in v)))
    if tag == "i" and type(v) is str and len(v) < 100000:
        return int(v, 16)
    if tag == "f" and v in ("inf", "-inf", "nan"):
        return float(v)
    if tag == "c" and type(v) is list and len(v) == 2:
        re_, im = (_decode(p, d) for p in v)
        if type(re_) is float and type(im) is float:
            return complex(re_, im)
    if tag in ("b", "ba") and type(v) is str:
        return (bytes if tag == "b" else bytearray).fromhex(v)
    if tag == "r" and type(v) is list and len(v) == 3 and all(type(e) is int for e in v):
        return range(*v)
    if tag == "q" and type(v) is list and len(v) == 2:
        num, den = (_decode(p, d) for p in v)
        if type(num) is int and type(den) is int:
            return Fraction(num, den)
    if tag == "m" and type(v) is str and len(v) < 10000:
        return Decimal(v)
    raise ValueError(f"bad tag {tag!r}")


def _judge(p, line):
    """(verdict, why) of one test from its result line, by the plan alone."""
    if type(line) is not dict or type(line.get("v")) is not list or len(line["v"]) != len(p.probes) \
            or type(line.get("n")) is not dict:
        return False, "malformed result"
    for name in sorted(p.names):
        if line["n"].get(name) != "module":
            return False, f"{name!r} is not the {name} module in the program's namespace (NameError)"
    values = []
    for item, (src, truth) in zip(line["v"], p.probes):
        if type(item) is not list or len(item) != 2 or item[0] not in ("ok", "truth", "err", "bad"):
            return False, "malformed result"
        status, payload = item
        if status == "ok":
            try:
                payload = _decode(payload)
            except (ValueError, TypeError, RecursionError, ArithmeticError) as e:
                return False, f"{src}: undecodable value ({e})"
        elif status == "truth" and type(payload) is not bool:
            return False, "malformed result"
        values.append((status, payload, src))

    def value(node):
        if node[0] == "value":
            if not node[1]:
                raise _Fail(f"the expected side raised {node[2]}")
            return node[2]
        status, payload, src = values[node[1]]
        if status == "ok":
            return payload
        if status == "err":
            raise _Fail(f"{src} raised {payload}")
        raise _Fail(f"{src} returned a {payload if status == 'bad' else 'non-data object'}, not plain data")

    def truth(node):
        kind = node[0]
        if kind == "not":
            return not truth(node[1])
        if kind in ("and", "or"):
            for sub in node[1]:
                if truth(sub) == (kind == "or"):
                    return kind == "or"
            return kind == "and"
        if kind == "cmp":
            operands, ops = node[1], node[2]
            left = value(operands[0])
            for op, right_node in zip(ops, operands[1:]):
                right = value(right_node)
                if not _OPS[op](left, right):
                    return False
                left = right
            return True
        if kind == "call":
            return bool(node[1](*[value(a) for a in node[2]], **{k: value(v) for k, v in node[3].items()}))
        if kind == "probe" and values[node[1]][0] == "truth":
            return values[node[1]][1]
        return bool(value(node))

    try:
        return (True, "") if truth(p.tree) else (False, f"{p.test!r} is false")
    except _Fail as e:
        return False, str(e)
    except Exception as e:                            # e.g. set() of unhashable values, as Python would
        return False, f"{p.test!r}: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------
# The harness side of a run.

def run_program(code, tests, setup_code="", *, timeout=10.0, memory_mb=MEMORY_MB,
                output_limit=OUTPUT_LIMIT, disk_mb=DISK_MB):
    """Run `code`, then `setup_code`, then each assert's probes in a sandbox; the verdict is decided
    here (module docstring). Raises ValueError on an empty `tests`."""
    tests = list(tests)
    if not tests:
        raise ValueError("sandbox: an empty test list would pass any program")
    plans = []
    for k, test in enumerate(tests):
        try:
            plans.append(_Plan(test))
        except Undecomposable as e:
            return RunResult(False, "failed", None, 0.0, "", [], f"test {k} cannot be decided "
                             f"outside the sandbox ({e}); the run fails without running")
    root = tempfile.mkdtemp(prefix="soka-sandbox-")
    job = {"code": code, "setup": setup_code or "", "root": os.path.realpath(root), "harness": os.getpid(),
           "tests": [{"probes": p.probes, "names": sorted(p.names)} for p in plans],
           "path": [p for p in sys.path if p and os.path.isabs(p)],
           "memory": memory_mb << 20, "cpu": math.ceil(timeout) + 1, "fsize": FILE_LIMIT,
           "disk": disk_mb << 20}
    env = {"PATH": os.defpath, "HOME": job["root"], "TMPDIR": job["root"], "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    read_fd, proc, detail = None, None, ""
    start = time.monotonic()
    try:
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-S", "-E", "-B", "-u", "-c", _RUNNER, str(write_fd)],
                                    cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)  # the sandbox holds the only write end now
        try:
            proc.stdin.write(marshal.dumps(job))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        passed, timed_out, output, prot, detail = _collect(proc, read_fd, plans, start + timeout,
                                                           output_limit, root, disk_mb << 20)
        seconds = time.monotonic() - start
    finally:
        if proc is not None and proc.returncode is None:
            _kill(proc)
        if read_fd is not None:
            os.close(read_fd)
        left = _remove(root)
    if left:
        detail = (detail + "; " if detail else "") + left
        warnings.warn(f"sandbox: {left}", RuntimeWarning, stacklevel=2)
    status = "passed" if passed else "timeout" if timed_out else "failed"
    return RunResult(passed, status, proc.returncode, seconds, output.decode("utf-8", errors="replace"),
                     prot, detail)


def _kill(proc):
    """SIGKILL the launcher's process group (before reaping, so the id cannot be reused); the
    program dies with the launcher (PR_SET_PDEATHSIG) and takes its PID namespace with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _collect(proc, result_fd, plans, deadline, output_limit, root, disk):
    """Read output and results until the verdict is known, both pipes close or the deadline passes;
    then kill the run and wait (up to 5 s) until every holder of the pipes is gone."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "output")
    sel.register(result_fd, selectors.EVENT_READ, "result")
    output, buf, received = bytearray(), bytearray(), 0
    prot, verdict, timed_out, detail, k = None, None, False, "", 0
    next_check = time.monotonic() + 0.2

    def on_line(line):
        nonlocal prot, k
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return False, "malformed result"
        if prot is None:
            if type(obj) is not dict or type(obj.get("p")) is not list:
                return False, "malformed result"
            prot = [str(x) for x in obj["p"]]
            return None, ""
        if type(obj) is not dict or obj.get("k") != k:
            return False, "results out of order"
        ok, why = _judge(plans[k], obj)
        k += 1
        if not ok:
            return False, f"test {k - 1}: {why}"
        return (True, "") if k == len(plans) else (None, "")

    while sel.get_map() and verdict is None:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(min(left, 0.2)):
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                sel.unregister(key.fileobj)
            elif key.data == "output":
                if len(output) < output_limit:
                    output += chunk[:output_limit - len(output)]
            elif verdict is None:
                received += len(chunk)
                if received > RESULT_LIMIT:
                    verdict, detail = False, "too much result data"
                    break
                buf += chunk
                while verdict is None and b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf = bytearray(rest)
                    verdict, detail = on_line(line)
        if verdict is None and prot is not None and not any(p.startswith("tmpfs") for p in prot) \
                and time.monotonic() > next_check:
            next_check = time.monotonic() + 0.2
            if _tree_bytes(root) > disk:
                verdict, detail = False, f"its folder grew past {disk >> 20} MiB"
    if verdict is None and not timed_out:
        detail = "ended before the last test reported" + (f" (test {k})" if prot is not None else "")
    _kill(proc)
    end = time.monotonic() + 5
    while sel.get_map() and time.monotonic() < end:   # EOF: nothing in the sandbox holds a pipe
        for key, _ in sel.select(0.1):
            if not os.read(key.fd, 1 << 16):
                sel.unregister(key.fileobj)
    if sel.get_map():
        detail = (detail + "; " if detail else "") + "a process kept its pipes open for 5 s after the kill"
    sel.close()
    proc.stdout.close()
    return verdict is True, timed_out and verdict is None, bytes(output), prot or [], detail


def _tree_bytes(root):
    total = 0
    try:
        for dirpath, dirs, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except OSError:
                    pass
    except OSError:
        pass
    return total


def _remove(root):
    """Remove the run's folder, clearing immutable/append-only flags if rmtree fails; what is left."""
    for attempt in range(2):
        try:
            shutil.rmtree(root)
            return ""
        except FileNotFoundError:
            return ""
        except OSError as e:
            if attempt:
                return f"could not remove {root}: {e}"
            _clear_flags(root)
    return ""


def _clear_flags(root):
    import fcntl
    get, set_, immutable_append = 0x80086601, 0x40086602, 0x10 | 0x20  # FS_IOC_{GET,SET}FLAGS
    for dirpath, dirs, files in os.walk(root):
        for path in [dirpath] + [os.path.join(dirpath, n) for n in dirs + files]:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                flags = bytearray(8)
                fcntl.ioctl(fd, get, flags)
                value = int.from_bytes(flags[:4], sys.byteorder)
                if value & immutable_append:
                    fcntl.ioctl(fd, set_, (value & ~immutable_append).to_bytes(4, sys.byteorder) + bytes(4))
            except OSError:
                pass
            finally:
                os.close(fd)


def mbpp_run(code, tests, setup_code="", timeout=10.0):
    """True iff every assert in `tests` holds after `code` and `setup_code`, sandboxed."""
    return run_program(code, tests, setup_code, timeout=timeout).passed


def run_many(jobs, *, timeout=10.0, workers=None, progress=False, **options):
    """`run_program` over (code, tests[, setup_code]) tuples, `workers` at a time (default: CPUs).

    Threads only wait on their children, so the children are the parallelism. An interrupt (Ctrl-C)
    cancels the programs not yet started and waits only for those running (each within `timeout`).
    """
    jobs = [(job[0], list(job[1]), *job[2:]) for job in jobs]
    if any(not job[1] for job in jobs):
        raise ValueError("sandbox: an empty test list would pass any program")
    pool = ThreadPoolExecutor(workers or os.cpu_count() or 1)
    try:
        futures = [pool.submit(run_program, *job, timeout=timeout, **options) for job in jobs]
        for _ in tqdm(as_completed(futures), total=len(futures), desc="mbpp", unit="program", disable=not progress):
            pass
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def landlock_abi():
    """The kernel's Landlock ABI version (0: none), so callers can say which guarantees hold."""
    try:
        import ctypes
        call = ctypes.CDLL(None, use_errno=True).syscall
        call.restype = ctypes.c_long
        return max(0, call(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
    except (OSError, AttributeError):
        return 0


def protections(timeout=10.0):
    """The layers a run gets on this machine (RunResult.protections of a trivial run)."""
    return run_program("", ["assert True"], timeout=timeout).protections
