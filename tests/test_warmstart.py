"""Warm stages (coreml_pipeline/warmstart.py): `python -m stages.<name>` served by a fork of a process
that preloaded torch, transformers and coremltools behaves as the stage run in its own process would:
same argv, working directory, environment, output and exit status, the project's code as it is now,
Ctrl-C forwarded, and a killed client takes its stage with it. (The whole pipeline runs warm in every
end-to-end test; outputs byte-identical to a run with PIPELINE_WARM=0: test_pipeline.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from unittest import mock

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent('''
    import os, sys
    preloaded = "torch" in sys.modules  # before this module imports anything heavy
    from stages import helper
    if "--sleep" in sys.argv:
        open(sys.argv[-1], "w").write(str(os.getpid()))
        import time
        time.sleep(120)
    print("argv", sys.argv[1:])
    print("cwd", os.getcwd())
    print("env", os.environ.get("PROBE_VALUE"))
    print("preloaded", preloaded)
    print("helper", helper.VALUE)
    print("to stderr", file=sys.stderr)
    if "--fail" in sys.argv:
        raise RuntimeError("the probe failed")
    raise SystemExit(int(os.environ.get("PROBE_EXIT", "0")))
''')


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project whose stages package is the real one plus a probe stage (it spawns a server: its
    name is in no spawn list, so the tests ask run_in_server through the probe's own __init__)."""
    root = tmp_path_factory.mktemp("warm")
    (root / "stages").mkdir()
    init = (ROOT / "stages" / "__init__.py").read_text().replace('"evaluate"}', '"evaluate", "probe"}')
    (root / "stages" / "__init__.py").write_text(init)
    (root / "stages" / "probe.py").write_text(PROBE)
    (root / "stages" / "helper.py").write_text("VALUE = 1\n")
    runtime = Path(tempfile.mkdtemp(prefix="warm-", dir="/tmp"))  # a Unix socket's path has at most 107 bytes
    yield root, runtime
    from coreml_pipeline import warmstart

    with mock.patch.dict(os.environ, {"XDG_RUNTIME_DIR": str(runtime)}):
        warmstart.stop()
    shutil.rmtree(runtime, ignore_errors=True)


def env_for(project, **extra) -> dict[str, str]:
    root, runtime = project
    return {**os.environ, "PYTHONPATH": f"{root}:{ROOT}", "XDG_RUNTIME_DIR": str(runtime),
            "PIPELINE_WARM_IDLE": "60", **extra}


def probe(project, *args, cwd=None, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.probe", *args], cwd=cwd or project[0],
                          env=env_for(project, **extra), capture_output=True, text=True, timeout=300)


def test_a_warm_stage_gets_its_argv_cwd_environment_output_and_status(project, tmp_path):
    first = probe(project, "a", "--b=c", PROBE_VALUE="x")
    assert first.returncode == 0, first.stderr
    assert "preloaded True" in first.stdout  # served by the server, which imported torch
    assert "argv ['a', '--b=c']" in first.stdout and "env x" in first.stdout
    assert "to stderr" in first.stderr
    elsewhere = probe(project, cwd=tmp_path, PROBE_VALUE="x", PROBE_EXIT="3")
    assert elsewhere.returncode == 3
    assert f"cwd {tmp_path}" in elsewhere.stdout and "preloaded True" in elsewhere.stdout
    failed = probe(project, "--fail", PROBE_VALUE="x")
    assert failed.returncode == 1 and "RuntimeError: the probe failed" in failed.stderr


def test_without_warm_stages_the_stage_runs_in_its_own_process(project):
    cold = probe(project, PIPELINE_WARM="0")
    assert cold.returncode == 0, cold.stderr
    assert "preloaded False" in cold.stdout


def test_a_missing_runtime_directory_runs_the_stage_in_its_own_process(project, tmp_path):
    (tmp_path / "file").write_text("")
    fallback = probe(project, XDG_RUNTIME_DIR=str(tmp_path / "file"))
    assert fallback.returncode == 0, fallback.stderr
    assert "preloaded False" in fallback.stdout and "running in this process" in fallback.stderr


def test_the_project_code_is_imported_fresh_for_every_stage(project):
    root, _ = project
    assert "helper 1" in probe(project).stdout
    (root / "stages" / "helper.py").write_text("VALUE = 2\n")
    try:
        edited = probe(project)
        assert "helper 2" in edited.stdout and "preloaded True" in edited.stdout
    finally:
        (root / "stages" / "helper.py").write_text("VALUE = 1\n")


def test_another_environment_gets_another_server(project):
    env = env_for(project)
    before = set(_servers(env))
    assert probe(project, OMP_NUM_THREADS="1").returncode == 0  # read by libgomp when torch loads
    after = set(_servers(env))
    assert len(after - before) == 1


def _servers(env) -> list[int]:
    listing = subprocess.run([sys.executable, "-m", "coreml_pipeline.warmstart", "--list"], env=env,
                             capture_output=True, text=True, check=True).stdout
    return [int(word) for word in listing.split() if word.isdigit()]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_or_interrupted_client_takes_its_stage_with_it(project, tmp_path, how):
    pid_file = tmp_path / "pid"
    client = subprocess.Popen([sys.executable, "-m", "stages.probe", "--sleep", str(pid_file)], cwd=project[0],
                              env=env_for(project), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    stage = int(pid_file.read_text())
    assert stage != client.pid and psutil.pid_exists(stage)
    client.send_signal(getattr(signal, how))
    _, stderr = client.communicate(timeout=60)
    deadline = time.time() + 10
    while _alive(stage) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(stage)
    if how == "SIGINT":  # forwarded: the stage raised KeyboardInterrupt and the client exits as it did
        assert "KeyboardInterrupt" in stderr
        assert client.returncode == -signal.SIGINT
    else:
        assert client.returncode == -signal.SIGKILL


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_socket_path_too_long_runs_the_stage_in_its_own_process(project, tmp_path):
    deep = tmp_path / ("x" * 100)
    deep.mkdir()
    fallback = probe(project, XDG_RUNTIME_DIR=str(deep))
    assert fallback.returncode == 0, fallback.stderr
    assert "preloaded False" in fallback.stdout and "socket path longer than 107 bytes" in fallback.stderr


def test_a_runtime_directory_others_can_open_is_not_used(project, tmp_path):
    """In a shared temporary directory another user could have made it first, with a server of theirs."""
    shared = tmp_path / f"coreml-pipeline-warm-{os.getuid()}"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    fallback = probe(project, XDG_RUNTIME_DIR=str(tmp_path))
    assert fallback.returncode == 0, fallback.stderr
    assert "preloaded False" in fallback.stdout and "closed to others" in fallback.stderr


def test_the_servers_can_be_listed_and_stopped(project):
    runtime = Path(tempfile.mkdtemp(prefix="warm-", dir="/tmp"))
    env = env_for(project, XDG_RUNTIME_DIR=str(runtime))
    assert probe(project, XDG_RUNTIME_DIR=str(runtime)).returncode == 0
    running = _servers(env)
    assert len(running) == 1
    stopped = subprocess.run([sys.executable, "-m", "coreml_pipeline.warmstart", "--stop"], env=env,
                             capture_output=True, text=True, check=True).stdout
    assert str(running[0]) in stopped
    deadline = time.time() + 10
    while _alive(running[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(running[0]) and _servers(env) == []
    shutil.rmtree(runtime)


def test_warm_stages_are_opt_in_on_macos(monkeypatch):
    """A fork of a process that loaded Core ML's Objective-C runtime may crash on macOS."""
    from coreml_pipeline import warmstart

    monkeypatch.delenv("PIPELINE_WARM", raising=False)
    assert warmstart.enabled()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not warmstart.enabled()
    monkeypatch.setenv("PIPELINE_WARM", "1")
    assert warmstart.enabled()
    monkeypatch.setenv("PIPELINE_WARM", "0")
    assert not warmstart.enabled()


def test_the_server_skips_only_torch_librarys_exit_teardown():
    """torch.library's per-library deregistration at exit (175 finalizers after the preload, about 37 ms of every
    stage's exit) is turned off in the server; other finalizers keep running at exit."""
    import weakref

    import torch

    from coreml_pipeline import warmstart

    layer = torch.nn.Linear(1, 1)
    other = weakref.finalize(layer, lambda: None)
    warmstart._skip_library_teardown()
    teardown = [f for f, info in weakref.finalize._registry.items() if info.func is torch.library._del_library]
    assert teardown and not any(f.atexit for f in teardown)
    assert other.atexit
    other.detach()
