"""What made a package: recorded inside it, and read back by the audit.

The convert stage writes these entries into the .mlpackage's user-defined
metadata (shown by Xcode). None of them is a date, so the same inputs give the
same bytes; the git commit says when.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from coreml_pipeline.runtime import sha256_file  # the one file hash; provenance.sha256_file for its callers

PREFIX = "coreml_compress."
KEYS = ("config", "git_commit", "git_dirty", "source_model_sha256", "data_sha256", "samples_used", "versions",
        "platform", "weights_sha256")
# Entries holding JSON.
JSON_KEYS = ("config", "data_sha256", "samples_used", "versions", "platform")
# Entries packages made by earlier versions lack (their absence is not a gap in the record).
SINCE_LATER_VERSIONS = ("samples_used",)
# What can change a package: the recorded commit is the last one that touched
# these, so committing a run's dvc.lock, docs or tests afterwards changes nothing.
SOURCES = ("stages", "coreml_pipeline", "pyproject.toml", "conf", "params.yaml", "dvc.yaml", "data", "requirements.txt", "constraints.txt")


def package_weights_sha256(package: Path) -> str:
    """One sha256 over every weight file of a package (relative name and bytes)."""
    return sha256_file(package / "Data" / "com.apple.CoreML" / "weights")


def git_state(root: Path = Path(".")) -> tuple[str, bool]:
    """(last commit that changed the pipeline's SOURCES, whether they differ from it);
    ("unknown", True) outside git."""
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", *SOURCES], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *SOURCES],
                                cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit or "unknown", bool(status.strip())


def source_model_sha256(model_dir: str) -> str:
    """sha256 of the model's weight files; a hub id not on disk records the id."""
    root = Path(model_dir)
    if root.is_file():  # a custom module's state dict
        return json.dumps({root.name: sha256_file(root)})
    files = sorted(p for p in root.glob("*") if p.suffix in (".safetensors", ".bin")) if root.is_dir() else []
    if not files:
        return f"unresolved:{model_dir}"
    return json.dumps({p.name: sha256_file(p) for p in files}, sort_keys=True)


def versions() -> dict[str, str]:
    import coremltools
    import torch
    import transformers

    return {"coremltools": coremltools.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def collect(sections: dict[str, Any], data_files: list[Path], model_dir: str, platform: dict[str, Any],
            samples_used: dict[str, int] | None = None) -> dict[str, str]:
    """Every entry but weights_sha256, which is known only once the package is saved.

    ``samples_used``: each calibration count as used (techniques.registry.samples_used); the config
    holds what was asked, which a small split can cap. None (a float package): no such entry.

    ``platform`` is coreml_pipeline.numerics.fingerprint: in portable mode the same on every x86-64 CPU
    with AVX2, so the package's bytes do not depend on which such machine made it."""
    commit, dirty = git_state()
    config = {name: dataclasses.asdict(section) for name, section in sections.items()}
    entries = {
        PREFIX + "config": json.dumps(config, sort_keys=True),
        PREFIX + "git_commit": commit,
        PREFIX + "git_dirty": str(dirty).lower(),
        PREFIX + "source_model_sha256": source_model_sha256(model_dir),
        PREFIX + "data_sha256": json.dumps({str(p): sha256_file(p) for p in sorted(data_files)}, sort_keys=True),
        PREFIX + "versions": json.dumps(versions(), sort_keys=True),
        PREFIX + "platform": json.dumps(platform, sort_keys=True),
    }
    if samples_used is not None:
        entries[PREFIX + "samples_used"] = json.dumps(samples_used, sort_keys=True)
    return entries


class PackageError(Exception):
    """Not a readable .mlpackage of this pipeline: one line saying why."""


def open_package(package: Path) -> dict[str, str]:
    """The package's user-defined metadata; PackageError when it is no readable .mlpackage."""
    from coremltools.proto import Model_pb2
    from google.protobuf.message import DecodeError

    if not package.exists():
        raise PackageError(f"{package} does not exist")
    manifest_path = package / "Manifest.json"
    if not package.is_dir() or not manifest_path.is_file():
        raise PackageError(f"{package} is not an .mlpackage (no Manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PackageError(f"{manifest_path} is corrupted: {type(exc).__name__} {exc}".strip()) from None
    spec_path = package / "Data" / root
    if not spec_path.is_file():
        raise PackageError(f"{package}: the model spec {root} named by Manifest.json is missing")
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(spec_path.read_bytes())
    except DecodeError as exc:
        raise PackageError(f"{spec_path} is corrupted: the model spec does not parse ({exc})") from None
    metadata = dict(spec.description.metadata.userDefined)
    if not any(key.startswith(PREFIX) for key in metadata):
        raise PackageError(f"{package} has no provenance (no {PREFIX}* metadata): it was not made by this "
                       "pipeline (plain coremltools?)")
    return metadata


def read(user_defined: dict[str, str]) -> dict[str, Any]:
    """The provenance entries of a package's metadata, JSON values decoded."""
    out = {}
    for key in KEYS:
        value = user_defined.get(PREFIX + key)
        if value is not None and key in JSON_KEYS:
            value = json.loads(value)
        out[key] = value
    return out
