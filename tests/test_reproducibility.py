"""Bit-for-bit outputs, provenance inside the package, the audit, and stages
killed mid-run, on the reduced config."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import SIMULATED_CPUS, copy_of_reduced_run, project_env, run

from coreml_pipeline.coreml import provenance

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
    return run([sys.executable, "-m", "coreml_pipeline.tools.audit", str(package), "--repo", str(project), *flags], project,
               check=False)


def test_package_carries_its_provenance(built):
    project, code_commit, _ = built
    result = json.loads(audit(project, project / PACKAGE, "--json").stdout)
    record = result["provenance"]
    assert record["git_commit"] == code_commit and record["git_dirty"] == "false"
    assert set(record["config"]) == {"model", "data", "prune", "finetune", "calibrate", "palettize", "quantize",
                                     "convert", "runtime"}
    assert record["config"]["runtime"] == {"numerics": "portable", "threads": 2}
    platform = record["platform"]
    assert platform["numerics"] == "portable" and platform["machine"] == "x86_64" and platform["os"] == "Linux"
    assert platform["torch_cpu_capability"] == "AVX2" and platform["blas"].endswith("CNR COMPATIBLE,STRICT")
    assert platform["onednn"] == "off" and platform["threads"] == 2 and platform["device"] == "cpu"
    assert record["config"]["palettize"]["n_bits"] == 2 and record["config"]["prune"]["method"] == "sparse_gpt"
    assert set(record["versions"]) == {"coremltools", "torch", "transformers", "python"}
    assert list(record["data_sha256"]) == ["data/stsb/sts-dev.csv"]
    assert "model.safetensors" in record["source_model_sha256"]
    assert record["weights_sha256"] == provenance.package_weights_sha256(project / PACKAGE)


def test_audit_passes_and_search_finds_the_recording_commit(built):
    project, _, lock_commit = built
    result = audit(project, project / PACKAGE, "--search")
    assert result.returncode == 0, result.stdout
    assert "verdict      identical: byte for byte the package a dvc.lock records (exit 0)" in result.stdout
    assert '"numerics": "portable"' in result.stdout  # the platform line
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
    assert "verdict      tampered" in result.stdout


def test_audit_fails_on_an_edited_metadata_entry(built, tmp_path):
    def edit(meta):
        config = json.loads(meta["coreml_compress.config"])
        config["palettize"]["n_bits"] = 4
        meta["coreml_compress.config"] = json.dumps(config, sort_keys=True)

    result = _tampered(built, tmp_path, lambda p: _edit_metadata(p, edit))
    assert result.returncode == 1
    assert "FAIL  dvc.lock records this package" in result.stdout
    assert "PASS  weights hash" in result.stdout  # the weights are untouched: the provenance lies
    assert "FAIL  config matches the commit: palettize.n_bits recorded 4, commit 2" in result.stdout
    assert "verdict      tampered" in result.stdout


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


def _strip_provenance(package):
    _edit_metadata(package, lambda meta: [meta.pop(k) for k in list(meta) if k.startswith(provenance.PREFIX)])


def _corrupt_manifest(package):
    (package / "Manifest.json").write_text("{ not json")


def _corrupt_spec(package):
    (package / "Data/com.apple.CoreML/model.mlmodel").write_bytes(b"\xff\x00 not a protobuf \x07" * 10)


@pytest.mark.parametrize("edit, message", [
    (_strip_provenance, "has no provenance (no coreml_compress.* metadata): it was not made by this pipeline"),
    (_corrupt_manifest, "Manifest.json is corrupted: JSONDecodeError"),
    (_corrupt_spec, "model.mlmodel is corrupted: the model spec does not parse"),
], ids=["plain-coremltools", "manifest", "spec"])
def test_audit_of_a_package_it_cannot_read_is_one_line(built, tmp_path, edit, message):
    result = _tampered(built, tmp_path, edit)
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_audit_of_a_path_that_is_not_a_package_or_a_shallow_clone_is_one_line(built, tmp_path):
    project = built[0]
    for path, message in [(project / "dvc.lock", "is not an .mlpackage (no Manifest.json)"),
                          (tmp_path / "nothing.mlpackage", "does not exist")]:
        result = audit(project, path)
        assert result.returncode == 2 and result.stderr.strip() == f"audit: {path} {message}"
    shallow = tmp_path / "shallow"
    run(["git", "clone", "-q", "--depth", "1", f"file://{project}", str(shallow)], tmp_path)
    result = audit(shallow, project / PACKAGE)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"audit: commit {built[1]} is not in this shallow clone ({shallow}); "
                                     "run `git fetch --unshallow` and audit again")


def test_decoded_weights_beyond_tolerance_are_tampered(built, tmp_path, monkeypatch):
    """A package re-made from the commit's config and data but not recorded (its provenance
    restamped, so it is internally consistent) is compared with the recorded build from the DVC
    cache; with the tolerances at zero one flipped weight byte is beyond them."""
    from coreml_pipeline.coreml.convert import make_reproducible
    from coreml_pipeline.tools import audit as audit_lib

    project = built[0]
    copy = tmp_path / "model.mlpackage"
    shutil.copytree(project / PACKAGE, copy)
    _flip_byte(copy)
    meta = audit_lib.open_package(copy)
    make_reproducible(copy, {k: v for k, v in meta.items() if k.startswith(provenance.PREFIX)})
    result = audit_lib.audit(copy, project)
    assert result["verdict"] == "rebuilt elsewhere (equivalent)" and result["exit_code"] == 3
    assert result["comparisons"][0]["against"].startswith("the recorded build")
    assert result["platform_differences"] == []  # made here: the same platform
    monkeypatch.setitem(audit_lib.TOLERANCES, "max_differing_fraction", 0.0)
    result = audit_lib.audit(copy, project)
    assert result["verdict"] == "tampered" and result["exit_code"] == 1
    assert "beyond tolerance in 1 weight(s)" in result["comparisons"][0]["reason"]


def test_rebuild_on_a_simulated_other_cpu_is_bit_identical_in_every_stage(built):
    """The rebuild (every stage through evaluate, in a worktree, temporary cache) runs under the
    second simulated CPU: with the reduced run as-is, two CPU/thread settings give the same bytes for
    every output of every float stage (and palettize onward under the first: the kill test below)."""
    project = built[0]
    settings = list(SIMULATED_CPUS.values())[1]
    cache = sorted(str(p) for p in (project / ".dvc" / "cache").rglob("*"))
    text = run([sys.executable, "-m", "coreml_pipeline.tools.audit", PACKAGE, "--rebuild"], project, check=False, env=settings)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "PASS  rebuild: identical bytes" in text.stdout
    assert "first stage whose outputs differ" not in text.stdout  # every stage's outputs equal the recorded lock's
    assert sorted(str(p) for p in (project / ".dvc" / "cache").rglob("*")) == cache  # the audit wrote no cache entry


def test_a_stage_killed_mid_run_then_rerun_gives_identical_outputs(built, tmp_path):
    """In a second clone (same commits, the first run's DVC cache linked in), on a simulated other
    CPU (conftest.SIMULATED_CPUS: its pins must override those settings), palettize and every stage
    after it run again (forced, run-cache off); palettize is killed mid-run, then `dvc repro` reruns
    it. Every output ends bit-identical to the first run's. (Every stage from nothing on the other
    simulated CPU: the audit's rebuild test above; this one used to run the whole cold pipeline
    again too, 80-120 s.)"""
    reference = lock_outs(built[0])
    project = tmp_path / "clone"
    run(["git", "clone", "-q", str(built[0]), str(project)], tmp_path)
    # Hard links: DVC keeps its cache read-only, and nothing here rewrites a cache file in place.
    shutil.copytree(built[0] / ".dvc" / "cache", project / ".dvc" / "cache", copy_function=os.link)
    run(["dvc", "checkout", "-q"], project)
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
    simulated = list(SIMULATED_CPUS.values())[0]
    dvc = subprocess.Popen(["dvc", "repro", "--force", "--no-run-cache", "--downstream", "palettize"], cwd=project,
                           env=project_env(project, simulated), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    # A warm stage (coreml_pipeline/warmstart.py) computes in a fork of the server, not below dvc: it must die
    # with its command. Nothing but the server itself may still work in the clone.
    from coreml_pipeline import warmstart

    deadline = time.time() + 10
    while _working_in(project, exclude=warmstart.servers()) and time.time() < deadline:
        time.sleep(0.2)
    assert not _working_in(project, exclude=warmstart.servers())
    assert not (project / "artifacts/palettize/weights.safetensors").exists()
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "palettize" in status
    rerun = run(["dvc", "repro", "--force", "--no-run-cache", "--downstream", "palettize"], project, env=simulated)
    assert "Running stage 'palettize'" in rerun.stdout and "Running stage 'evaluate'" in rerun.stdout, rerun.stdout
    assert lock_outs(project) == reference


def _working_in(directory: Path, exclude: list[int]) -> list[int]:
    """Live processes (not zombies) whose working directory is ``directory``."""
    found = []
    for process in psutil.process_iter(["pid", "cwd", "status"]):
        if process.info["cwd"] == str(directory) and process.info["pid"] not in exclude \
                and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process.info["pid"])
    return found


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
    assert run([sys.executable, "-m", "coreml_pipeline.tools.audit", PACKAGE, "--repo", "."], clone).returncode == 0

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(project), str(second)], tmp_path)
    pulled = run(["dvc", "repro", "--pull"], second)
    assert "stage=" not in pulled.stdout + pulled.stderr  # every stage restored, none executed
    assert lock_outs(second) == lock_outs(project)


def test_config_check_reads_null_mappings_as_the_schema_records_them():
    """The default palettize.layer_bits is null in params.yaml and {} in the recorded config: a package
    no dvc.lock records yet (dvc repro run, dvc.lock not committed) was called tampered for it."""
    from coreml_pipeline.tools.audit import differences

    assert differences({"palettize": {"layer_bits": {}, "n_bits": 4}}, {"palettize": {"layer_bits": None, "n_bits": 4}}) == []
    assert differences({"palettize": {"layer_bits": {"x": 2}}}, {"palettize": {"layer_bits": None}}) == [
        "palettize.layer_bits recorded {'x': 2}, commit None"]
