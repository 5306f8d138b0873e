"""Warm stages: `python -m stages.<name>` runs in a fork of a process that has already imported
torch, transformers, datasets and coremltools, instead of paying 3-4 s of imports in each stage.

Why by hand: DVC runs every stage's command in a fresh process, and nothing in Python's standard
library or in a well-kept package serves a whole command line (its stdin/stdout/stderr, argv, working
directory, environment and exit status) from a preloaded interpreter; multiprocessing's forkserver
only serves its own Process objects.

How it works:

- ``stages/__init__.py`` calls :func:`delegate_stage` while ``python -m stages.<name>`` is still
  resolving the module (before the stage's own code is imported). It connects to the server for
  this interpreter and environment, starting it when the stage is one that imports torch, and
  falls back to running in its own process when the server cannot be reached.
- The server imports only third-party libraries (:data:`PRELOAD`), never this project's code: each
  stage imports the project fresh from its own working tree, so an edited stage runs the edited code.
  Everything that import-time code can read is part of the server's key (interpreter, ``sys.path``,
  the installed packages' directories' modification times, this file, the environment), so a
  different environment or an installed package gets a server of its own.
- Per request the server forks a session process, which forks the stage: the stage gets the
  client's stdin/stdout/stderr (passed over the Unix socket), argv, cwd, environment and
  ``sys.path``, reseeds Python's and numpy's generators as a fresh process would, runs the module
  as ``__main__`` and its exit handlers, and exits with the stage's status, which the client exits
  with. The server never runs a torch operation: torch, MKL and OpenMP choose their code paths
  and threads in the stage, after coreml_pipeline.numerics has pinned them.
- Ctrl-C and SIGTERM on the client are forwarded to the stage; if the client dies (a killed
  `dvc repro`), the session kills the stage, which also dies with its session: nothing keeps
  writing into a workspace DVC has given up on.
- The server exits after ``PIPELINE_WARM_IDLE`` seconds without a request (default 120).
  ``PIPELINE_WARM=0`` runs every stage in its own process, as before.

This module imports only the standard library: the client side runs before anything else.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Third-party modules the stages import (measured from a cold `dvc repro` of the default): torch,
# transformers' model and tokenizer machinery, datasets (pandas, pyarrow), coremltools and its
# optimize.torch, numba (exact_dp k-means), scipy and safetensors.
PRELOAD = (
    "numpy", "torch", "safetensors.torch", "tokenizers", "transformers", "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto", "tqdm.auto",
    "datasets", "scipy.stats", "coremltools", "coremltools.optimize.torch", "numba",
    # torch._dynamo's exit handler formats its (empty) compile-time table with tabulate, importing it
    # at every stage's exit (about 25 ms a stage) unless it is here already.
    "tabulate",
)
# Variables that differ per invocation but that no import reads: left out of the server's key.
_VOLATILE_ENV = ("_", "PWD", "OLDPWD", "SHLVL", "PYTEST_CURRENT_TEST", "DVC_STAGE", "DVC_ROOT")
_HEADER = struct.Struct("!I")
_START_TIMEOUT_S = 120.0
_MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path on Linux, less its terminating NUL


def enabled() -> bool:
    setting = os.environ.get("PIPELINE_WARM", "")
    if setting == "0" or not (hasattr(socket, "send_fds") and hasattr(os, "fork")):
        return False
    # macOS: a fork of a process that has loaded Core ML's Objective-C runtime (coremltools loads it there)
    # may crash, the reason multiprocessing spawns on macOS; there it is PIPELINE_WARM=1 to opt in.
    return sys.platform != "darwin" or setting == "1"


def server_key() -> str:
    """What import-time code can read: a server is only reused by a client that would import the same."""
    digest = hashlib.sha256()
    site_dirs = sorted({p for p in sys.path if p and os.path.isdir(p)})
    record = {
        "executable": sys.executable, "version": sys.version, "path": sys.path, "uid": os.getuid(),
        "site": {p: os.stat(p).st_mtime_ns for p in site_dirs if "-packages" in p},
        "server": Path(__file__).stat().st_mtime_ns,
        "env": sorted((k, v) for k, v in os.environ.items() if k not in _VOLATILE_ENV),
    }
    digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def _runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"coreml-pipeline-warm-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    # Another user could have made it first (in a shared /tmp) and put a server of theirs in it, which
    # would receive this stage's environment and terminal: only a directory of ours, closed to others.
    status = path.stat(follow_symlinks=False)
    if status.st_uid != os.getuid() or status.st_mode & 0o077 or not path.is_dir() or path.is_symlink():
        raise OSError(f"{path} is not this user's own directory closed to others (mode 0700)")
    return path


# ---------------------------------------------------------------- client

def delegate_stage(package: str, spawn: frozenset[str] | set[str]) -> None:
    """Called from ``stages/__init__.py``: when this process is ``python -m stages.<name>`` (and
    not an import from elsewhere), run the stage in the warm server and exit with its status.
    ``spawn``: the stages that start a server when none runs (those that import torch); the others
    use a running one or run here. Returns (and the stage runs here) whenever delegation is not possible."""
    argv = getattr(sys, "orig_argv", [])
    if not enabled() or sys.argv[:1] != ["-m"] or "-m" not in argv:
        return
    index = argv.index("-m")
    module = argv[index + 1] if index + 1 < len(argv) else ""
    if not module.startswith(package + "."):
        return
    stage = module.split(".", 1)[1]
    code = run_in_server(module, argv[index + 2:], start=stage in spawn)
    if code is not None:
        _exit_like(code)


def run_in_server(module: str, args: list[str], start: bool = True) -> int | None:
    """Run ``python -m module args`` in the warm server; its exit code, or None when no server
    could be reached (the caller runs the module itself)."""
    try:
        address = str(_runtime_dir() / f"{server_key()}.sock")
        if len(address.encode()) > _MAX_SOCKET_PATH:
            raise OSError(f"socket path longer than {_MAX_SOCKET_PATH} bytes: {address}")
        connection = _connect(address)
        if connection is None and start:
            connection = _start_and_connect(address)
    except OSError as exc:  # no runtime directory, no socket: the stage runs in its own process
        print(f"warm stage server unavailable ({exc}); running in this process", file=sys.stderr)
        return None
    if connection is None:
        return None
    with connection:
        request = {"module": module, "argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path}
        payload = json.dumps(request).encode()
        try:
            socket.send_fds(connection, [_HEADER.pack(len(payload))], [0, 1, 2])
            connection.sendall(payload)
        except OSError:
            return None
        return _relay(connection)


def _connect(address: str) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(address)
    except OSError:
        connection.close()
        return None
    return connection


def _start_and_connect(address: str) -> socket.socket | None:
    log = Path(address).with_suffix(".log")
    with open(log, "ab") as log_file:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", address, "--path", json.dumps(sys.path)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True,
            close_fds=True)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        connection = _connect(address)
        if connection is not None:
            return connection
        # Exit 0: another client's server holds the lock and is still importing; keep waiting for it.
        if server.poll() not in (None, 0):
            print(f"warm stage server failed to start (its log: {log}); running in this process", file=sys.stderr)
            return None
        time.sleep(0.05)
    return None


def _relay(connection: socket.socket) -> int:
    """Forward Ctrl-C/SIGTERM to the stage until the session reports its exit status."""
    stage_pid: list[int] = []

    def forward(signum, _frame):
        if stage_pid:
            try:
                os.kill(stage_pid[0], signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        buffer = b""
        while True:
            chunk = connection.recv(4096)  # retried after a forwarded signal (PEP 475)
            if not chunk:
                # The session died without a status: report it like a crashed process would.
                print("warm stage server: the stage's session ended without an exit status", file=sys.stderr)
                return 1
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                if "pid" in message:
                    stage_pid.append(message["pid"])
                if "exit" in message:
                    return message["exit"]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_like(code: int) -> None:
    """Exit with ``code`` (a process status: its low byte), or, negative, killed by that signal; both
    the client (as its stage did) and the stage process (whose exit handlers ran already) end so."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: as interpreter shutdown, exit anyway
            pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code & 0xFF)


# ---------------------------------------------------------------- server

def serve(address: str, path: list[str]) -> None:
    import fcntl

    sys.path[:] = path
    lock = open(address + ".lock", "a+")  # noqa: SIM115 -- held for the server's whole life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server for this key is starting or running
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    started = time.perf_counter()
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception as exc:  # a library missing here is imported (or refused) by the stage itself
            print(f"warm stage server: not preloading {name}: {exc}", file=sys.stderr)
    _skip_library_teardown()
    # The preloaded objects go to the collector's permanent generation: a stage's garbage collections
    # would otherwise walk (and so copy, page by page) the server's whole heap, about 0.3 s per stage.
    gc.collect()
    gc.freeze()
    print(f"warm stage server {os.getpid()}: preloaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    sys.stderr.flush()
    if os.path.exists(address):
        os.unlink(address)  # a server killed earlier left its socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    listener.settimeout(float(os.environ.get("PIPELINE_WARM_IDLE", "120")))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    try:
        while True:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                return
            if os.fork() == 0:
                listener.close()
                lock.close()
                _session(connection)
            connection.close()
    finally:
        if os.path.exists(address):
            os.unlink(address)


def _skip_library_teardown() -> None:
    """torch.library deregisters each of its operator libraries at exit (a weakref finalizer apiece,
    175 after the preload): bookkeeping for a process about to end, which cost each stage about 37 ms
    of its exit handlers. Those finalizers stop running at exit; every other exit handler still runs."""
    import weakref

    torch = sys.modules.get("torch")
    teardown = getattr(getattr(torch, "library", None), "_del_library", None)
    for finalizer, info in list(weakref.finalize._registry.items()):
        if teardown is not None and info.func is teardown:
            finalizer.atexit = False


def _session(connection: socket.socket) -> None:
    """A fork of the server: forks the stage, reports its pid and exit status, and kills it if the
    client goes away. Never returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        connection.setblocking(True)
        # Only this user's processes may run code here (the socket's directory is 0700 too, which is
        # all there is where the peer's credentials cannot be asked: SO_PEERCRED is Linux's).
        if hasattr(socket, "SO_PEERCRED"):
            _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
            if uid != os.getuid():
                os._exit(1)
        data, fds, _, _ = socket.recv_fds(connection, _HEADER.size, 3)
        while len(data) < _HEADER.size:
            data += connection.recv(_HEADER.size - len(data))
        (length,) = _HEADER.unpack(data)
        payload = b""
        while len(payload) < length:
            chunk = connection.recv(length - len(payload))
            if not chunk:
                os._exit(1)
            payload += chunk
        request = json.loads(payload)
        # The stage's exit wakes _watch through this pipe (SIGCHLD; portable, unlike Linux's pidfd).
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            for fd in (wake_read, wake_write):
                os.close(fd)
            connection.close()
            _stage(request, fds)
        for fd in fds:
            os.close(fd)
        connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        code = _watch(connection, pid, wake_read)
        connection.sendall(json.dumps({"exit": code}).encode() + b"\n")
    finally:
        os._exit(0)


def _watch(connection: socket.socket, pid: int, wake: int) -> int:
    """The stage's exit status; if the client goes away first, the stage is killed and the session ends."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(connection, selectors.EVENT_READ, "client")
    selector.register(wake, selectors.EVENT_READ, "stage")
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        for key, _ in selector.select():
            if key.data == "stage":
                os.read(wake, 512)
            elif not connection.recv(4096):
                os.kill(pid, signal.SIGKILL)  # the client is gone: DVC has given up on this stage
                os.waitpid(pid, 0)
                os._exit(0)


def _stage(request: dict, fds: list[int]) -> None:
    """The stage process: the client's stdio, argv, cwd, environment and sys.path, then the module as
    __main__, as `python -m` would run it. Never returns."""
    import atexit
    import importlib.util
    import random
    import runpy
    import traceback

    code = 0
    try:
        _die_with_parent()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = request["path"]
        for name in [m for m in sys.modules if m.split(".")[0] in ("coreml_pipeline", "stages")]:
            del sys.modules[name]  # the project's code comes fresh from the client's tree
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        spec = importlib.util.find_spec(request["module"])
        sys.argv = [spec.origin if spec and spec.origin else request["module"], *request["argv"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 -- reported as Python reports an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what interpreter shutdown runs (_exit_like's os._exit skips it)
    finally:
        _exit_like(code)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the stage gets SIGKILL when its session dies, whatever killed the session."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def servers() -> list[int]:
    """Process ids of this user's running warm servers (each holds the lock file it wrote its pid in)."""
    import fcntl

    found = []
    for lock in _runtime_dir().glob("*.sock.lock"):
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = handle.read().strip()
                if text.isdigit():
                    found.append(int(text))
    return found


def stop() -> list[int]:
    """Stop this user's warm servers (e.g. after changing something their key cannot see)."""
    stopped = []
    for pid in servers():
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    return stopped


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The warm stage server: started by the stages on demand; "
                                     "--list or --stop the running ones.")
    parser.add_argument("--serve", help="(internal) the Unix socket to listen on")
    parser.add_argument("--path", help="(internal) the client's sys.path, as JSON")
    parser.add_argument("--list", action="store_true", help="print the running servers' process ids")
    parser.add_argument("--stop", action="store_true", help="stop the running servers")
    arguments = parser.parse_args()
    if arguments.serve:
        serve(arguments.serve, json.loads(arguments.path))
    elif arguments.stop:
        print(" ".join(map(str, stop())) or "no warm server running")
    else:
        print(" ".join(map(str, servers())) or "no warm server running")
