"""Bit-for-bit outputs, provenance inside the package, the audit, and stages
killed mid-run, on the reduced config."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from conftest import copy_of_reduced_run, project_env, run
from stages import provenance

PACKAGE = "artifacts/convert/model.mlpackage"


def lock_outs(project) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def commit_all(project, message: str) -> str:
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", message], project)
    return run(["git", "rev-parse", "HEAD"], project).stdout.strip()


@pytest.fixture(scope="module")
def built(reduced_run, tmp_path_factory):
    """The reduced pipeline run once, with its dvc.lock committed after the run."""
    project = copy_of_reduced_run(reduced_run, tmp_path_factory.mktemp("repro") / "project")
    code_commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    run(["git", "add", "dvc.lock", "metrics"], project)
    lock_commit = commit_all(project, "record the run")
    return project, code_commit, lock_commit


def audit(project, package, *flags):
    return run([sys.executable, "-m", "stages.audit", str(package), "--repo", str(project), *flags], project,
               check=False)


def test_package_carries_its_provenance(built):
    project, code_commit, _ = built
    result = json.loads(audit(project, project / PACKAGE, "--json").stdout)
    record = result["provenance"]
    assert record["git_commit"] == code_commit and record["git_dirty"] == "false"
    assert set(record["config"]) == {"model", "data", "prune", "finetune", "calibrate", "palettize", "quantize",
                                     "convert"}
    assert record["config"]["palettize"]["n_bits"] == 2 and record["config"]["prune"]["method"] == "sparse_gpt"
    assert set(record["versions"]) == {"coremltools", "torch", "transformers", "python"}
    assert list(record["data_sha256"]) == ["data/stsb/sts-dev.csv"]
    assert "model.safetensors" in record["source_model_sha256"]
    assert record["weights_sha256"] == provenance.package_weights_sha256(project / PACKAGE)


def test_audit_passes_and_search_finds_the_recording_commit(built):
    project, _, lock_commit = built
    result = audit(project, project / PACKAGE, "--search")
    assert result.returncode == 0, result.stdout
    assert "audit passed" in result.stdout
    assert f"in dvc.lock at {lock_commit}" in result.stdout
    assert f"made by      {lock_commit}" in result.stdout


def _tampered(built, tmp_path, edit) -> subprocess.CompletedProcess:
    project = built[0]
    copy = tmp_path / "model.mlpackage"
    shutil.copytree(project / PACKAGE, copy)
    edit(copy)
    return audit(project, copy)


def _edit_metadata(package, change):
    from coremltools.proto import Model_pb2

    path = package / "Data/com.apple.CoreML/model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    change(spec.description.metadata.userDefined)
    path.write_bytes(spec.SerializeToString(deterministic=True))


def _flip_byte(package):
    weights = package / "Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


def test_audit_fails_on_one_changed_byte(built, tmp_path):
    result = _tampered(built, tmp_path, _flip_byte)
    assert result.returncode == 1
    assert "FAIL  weights hash" in result.stdout and "FAIL  dvc.lock records this package" in result.stdout


def test_audit_fails_on_an_edited_metadata_entry(built, tmp_path):
    def edit(meta):
        config = json.loads(meta["coreml_compress.config"])
        config["palettize"]["n_bits"] = 4
        meta["coreml_compress.config"] = json.dumps(config, sort_keys=True)

    result = _tampered(built, tmp_path, lambda p: _edit_metadata(p, edit))
    assert result.returncode == 1
    assert "FAIL  dvc.lock records this package" in result.stdout


def test_audit_fails_on_a_missing_metadata_entry(built, tmp_path):
    result = _tampered(built, tmp_path, lambda p: _edit_metadata(p, lambda m: m.pop("coreml_compress.data_sha256")))
    assert result.returncode == 1
    assert "FAIL  provenance complete: missing: coreml_compress.data_sha256" in result.stdout


def test_audit_fails_on_a_commit_not_in_the_repository(built, tmp_path):
    def edit(meta):
        meta["coreml_compress.git_commit"] = "0" * 40

    result = _tampered(built, tmp_path, lambda p: _edit_metadata(p, edit))
    assert result.returncode == 1
    assert f"FAIL  commit in repository: commit {'0' * 40} is not in" in result.stdout


def test_rebuild_from_the_recorded_commit_is_bit_identical(built):
    project = built[0]
    result = audit(project, project / PACKAGE, "--rebuild")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  rebuild: identical bytes" in result.stdout


def test_cold_run_with_a_stage_killed_mid_run_gives_identical_outputs(built, tmp_path):
    """In a second clone (same commits, empty DVC cache and run-cache) every stage
    runs again from nothing; its palettize is killed, then `dvc repro` reruns it.
    Every output ends bit-identical to the first run's: both a fresh run and the
    rerun after a kill reproduce them (this also covers a forced rerun)."""
    reference = lock_outs(built[0])
    project = tmp_path / "clone"
    run(["git", "clone", "-q", str(built[0]), str(project)], tmp_path)
    dvc = subprocess.Popen(["dvc", "repro"], cwd=project, env=project_env(project), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    victim = None
    deadline = time.time() + 600
    while victim is None and time.time() < deadline:
        for child in psutil.Process(dvc.pid).children(recursive=True):
            try:
                if "stages.palettize" in " ".join(child.cmdline()):
                    victim = child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    assert victim is not None, "palettize never started"
    time.sleep(3)  # well inside the stage: model loaded, k-means running
    for process in [*victim.children(recursive=True), victim]:  # the stage and its k-means workers
        process.send_signal(signal.SIGKILL)
    output, _ = dvc.communicate(timeout=300)
    assert dvc.returncode != 0, output
    assert not (project / "artifacts/palettize/weights.safetensors").exists()
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "palettize" in status
    run(["dvc", "repro"], project)
    assert lock_outs(project) == reference


@pytest.fixture
def s3_server():
    """A real S3-compatible server (moto) on loopback, for the DVC remote."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([f"{sys.executable.rsplit('/', 1)[0]}/moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_push_and_pull_through_an_s3_remote_leave_nothing_to_rerun(built, s3_server, tmp_path, monkeypatch):
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="team-cache")
    project = built[0]
    run(["dvc", "remote", "add", "-d", "team", "s3://team-cache/dvc"], project)
    run(["dvc", "remote", "modify", "team", "endpointurl", s3_server], project)
    run(["git", "add", ".dvc/config"], project)
    commit_all(project, "team remote")
    run(["dvc", "push"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout) == {}
    assert run([sys.executable, "-m", "stages.audit", PACKAGE, "--repo", "."], clone).returncode == 0

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(project), str(second)], tmp_path)
    pulled = run(["dvc", "repro", "--pull"], second)
    assert "stage=" not in pulled.stdout + pulled.stderr  # every stage restored, none executed
    assert lock_outs(second) == lock_outs(project)
