"""Audit a shipped .mlpackage: what made it, on which platform, and whether that checks out.

    python -m coreml_pipeline.tools.audit artifacts/convert/model.mlpackage            # report + verdict
    python -m coreml_pipeline.tools.audit PKG --json                                   # the same, for machines
    python -m coreml_pipeline.tools.audit PKG --search                                 # every commit / experiment that made it
    python -m coreml_pipeline.tools.audit PKG --rebuild                                # re-make it here and compare

Verdicts and exit codes (docs/reproducibility.md):

  0  identical         byte for byte a package that a dvc.lock of this repository records
                       (at its commit, a later commit on that line, or with --search any
                       commit).
  6  recorded by an    byte for byte the package a DVC experiment's dvc.lock records (refs/exps,
     experiment        found without --search), not yet in a commit: `dvc exp apply NAME`
                       and commit dvc.lock to make it history.
  3  rebuilt elsewhere not recorded, but internally consistent (weights hash), made from an
     (equivalent)      existing commit's config and data, and, compared weight by weight with
                       the recorded build (from the DVC cache or a remote) or with a rebuild
                       here (--rebuild), equivalent within the documented tolerances.
  4  rebuilt elsewhere as 3, but neither the recorded package nor a rebuild was there to
     (not compared)    compare with: fetch it (dvc fetch) or run with --rebuild.
  5  rebuilt elsewhere as 3, on another platform than the recorded build (the platform
     (different)       records differ), but beyond tolerance: native numerics amplified the
                       difference (--rebuild names the first stage whose outputs differ).
  1  tampered          weights hash mismatch, missing or edited provenance (its config or data
                       differ from the commit's), an unknown commit, uncommitted sources, or
                       decoded weights beyond tolerance on the recorded build's own platform.
  2  bad input         not a package, no provenance at all (plain coremltools), a corrupted
                       Manifest.json or model spec, a commit missing from a shallow clone, an
                       unreadable public key or signature bundle.
  7  signature invalid the signature files next to the package do not verify with the key (or
                       certificate chain, or Sigstore identity) given: a changed, added or removed
                       file, another signer, an attestation of another package, or a predicate
                       that does not match the package (docs/signing.md). Decides over 0-6.
  8  not signed        --require-signature, and no signature next to the package.

Git is read through `git show`, nothing is checked out; --rebuild works in a
temporary worktree with a temporary DVC cache, so an audit never writes to the
repository's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from coreml_pipeline.coreml import provenance
from coreml_pipeline.coreml.provenance import (  # noqa: F401  (open_package: callers import it here)
    PackageError,
    open_package,
)

PACKAGE_OUT = "artifacts/convert/model.mlpackage"
# The pipeline's stages in the order they run: the first whose outputs differ is named.
STAGE_ORDER = ("inspect", "validate", "prune", "finetune", "calibrate", "palettize", "quantize", "convert", "baseline",
               "coreml_compress", "evaluate", "sign")
EXIT_CODES = {"identical": 0, "tampered": 1, "bad input": 2, "rebuilt elsewhere (equivalent)": 3,
              "rebuilt elsewhere (not compared)": 4, "rebuilt elsewhere (different)": 5,
              "recorded by an experiment": 6, "signature invalid": 7, "not signed": 8}
# Two builds of one commit on different CPUs are equivalent when, for every weight the network
# consumes, at most this fraction of its decoded values differ and the difference's L2 norm is at
# most this fraction of the weight's (a k-means index that flips at a cluster boundary moves one
# value by a whole centroid gap; a look-up entry moves by float16 ulps), and the headline quality
# of the two (when both were evaluated) differs by at most this much (its own units: STS-B points,
# dB, agreement). Measured differences between simulated CPUs: docs/reproducibility.md.
TOLERANCES = {"max_differing_fraction": 0.02, "max_relative_l2": 0.02, "max_quality_difference": 0.1}


class BadInput(Exception):
    """What makes a path impossible to audit; the message is one line."""


def git(*args: str, repo: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=check)


def dvc_dir_hash(package: Path) -> str:
    """The md5 DVC records for a directory output (its `.dir` tree hash), computed by DVC itself."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem

    with tempfile.TemporaryDirectory() as tmp:
        odb = HashFileDB(LocalFileSystem(), tmp)
        _, _, tree = build(odb, str(package.resolve()), LocalFileSystem(), "md5")
    return tree.hash_info.value


@lru_cache(maxsize=None)
def lock_at(repo: Path, commit: str) -> dict:
    """dvc.lock at ``commit`` (cached: a commit never changes, and the audit asks for the same
    commits when it looks for the recording commit, the recorded build and the first differing stage)."""
    shown = git("show", f"{commit}:dvc.lock", repo=repo, check=False)
    return (yaml.safe_load(shown.stdout) or {}) if shown.returncode == 0 else {}


def lock_records(repo: Path, commit: str, md5: str) -> bool:
    """Whether dvc.lock at ``commit`` lists an output with this hash."""
    lock = lock_at(repo, commit)
    return any(out.get("md5") == md5 for stage in (lock.get("stages") or {}).values() for out in stage.get("outs", []))


def experiment_names(repo: Path) -> dict[str, str]:
    refs = git("for-each-ref", "--format=%(objectname) %(refname)", "refs/exps", repo=repo, check=False).stdout
    return {line.split()[0]: line.split()[1].rsplit("/", 1)[-1] for line in refs.splitlines() if line.strip()}


def search(repo: Path, md5: str) -> list[dict[str, str]]:
    """Every commit and DVC experiment whose dvc.lock records this package."""
    names = experiment_names(repo)
    commits = git("log", "--all", "--format=%H", "--", "dvc.lock", repo=repo, check=False).stdout.split()
    return [{"commit": c, "experiment": names.get(c, "")} for c in commits if lock_records(repo, c, md5)]


def experiment_records(repo: Path, md5: str) -> list[dict[str, str]]:
    """The DVC experiments (refs/exps) whose dvc.lock records this package: name, its commit, and the
    commit it branches from (its parent)."""
    found = []
    for sha, name in experiment_names(repo).items():
        if lock_records(repo, sha, md5):
            baseline = git("rev-parse", f"{sha}^", repo=repo, check=False).stdout.strip()
            found.append({"experiment": name, "commit": sha, "baseline": baseline})
    return found


def line_from(repo: Path, commit: str) -> list[str]:
    """``commit`` and the later commits on its line to HEAD (a run is committed after it ran)."""
    later = git("rev-list", "--reverse", "--ancestry-path", f"{commit}..HEAD", repo=repo, check=False).stdout.split()
    return [commit, *later]


def recording_commit(repo: Path, commit: str, md5: str) -> str | None:
    return next((c for c in line_from(repo, commit) if lock_records(repo, c, md5)), None)


def _same_value(recorded: Any, expected: Any) -> bool:
    # The schema turns a null mapping into an empty one (palettize.layer_bits: null is recorded as {}).
    if expected is None and recorded in ({}, []):
        return True
    # PyYAML reads a float without a dot (6e-08, as DVC writes it) as a string.
    if isinstance(recorded, float) and isinstance(expected, str):
        try:
            return float(expected) == recorded
        except ValueError:
            return False
    return recorded == expected


def differences(recorded: Any, expected: Any, prefix: str = "") -> list[str]:
    """Keys of ``expected`` (params.yaml or a dvc.lock's params, dotted keys allowed) whose value
    in ``recorded`` (the package's config) differs."""
    if not isinstance(expected, dict):
        return [] if _same_value(recorded, expected) else [f"{prefix} recorded {recorded!r}, commit {expected!r}"]
    out = []
    for key, value in expected.items():
        node, found = recorded, True
        # A key as it is (a layer_bits pattern holds dots), else a dvc.lock's dotted path (data.dir).
        for part in [key] if isinstance(recorded, dict) and key in recorded else str(key).split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                found = False
                break
        name = f"{prefix}.{key}" if prefix else str(key)
        out += differences(node, value, name) if found else [f"{name} missing from the recorded config"]
    return out


def config_differences(repo: Path, commit: str, config: dict) -> list[str]:
    shown = git("show", f"{commit}:params.yaml", repo=repo, check=False)
    if shown.returncode != 0:
        return [f"no params.yaml at {commit}"]
    params = yaml.safe_load(shown.stdout) or {}
    return differences(config, {name: params.get(name) for name in config})


def data_differences(repo: Path, commit: str, data: dict[str, str]) -> list[str]:
    import hashlib

    out = []
    for path, digest in data.items():
        blob = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=repo, capture_output=True)
        if blob.returncode != 0:
            out.append(f"{path} is not in git at {commit}")
        elif hashlib.sha256(blob.stdout).hexdigest() != digest:
            out.append(f"{path} differs from the commit's")
    return out


def recorded_build(repo: Path, commit: str, config: dict) -> tuple[str, str] | None:
    """(commit, package md5) of the dvc.lock on the commit's line whose convert stage ran with
    this config: the build this package claims to be a rebuild of."""
    for candidate in line_from(repo, commit):
        stage = (lock_at(repo, candidate).get("stages") or {}).get("convert") or {}
        params = (stage.get("params") or {}).get("params.yaml")
        if params is None or differences(config, params):
            continue
        md5 = next((o["md5"] for o in stage.get("outs", []) if o.get("path") == PACKAGE_OUT), None)
        if md5:
            return candidate, md5
    return None


def fetch_recorded(repo: Path, commit: str, dest: Path) -> str | None:
    """The recorded package at ``commit`` copied to ``dest`` through DVC (its cache, or a remote);
    None when it is there, else why not."""
    from dvc.api import DVCFileSystem

    try:
        DVCFileSystem(str(repo), rev=commit).get(PACKAGE_OUT, str(dest), recursive=True)
    except Exception as exc:  # DVC's errors for a missing object differ by storage; all mean "not there"
        return f"the recorded package is in neither the DVC cache nor a remote ({type(exc).__name__})"
    return None


def _constexpr_inputs(program) -> dict[str, dict[str, Any]]:
    """Each constexpr op's stored inputs (look-up tables, indices, quantized data, scales), by output name."""
    import numpy as np

    stored = {}
    for op in program.functions["main"].operations:
        if op.op_type.startswith("constexpr"):
            stored[op.outputs[0].name] = {name: np.asarray(var.val) for name, var in op.inputs.items()
                                          if getattr(var, "val", None) is not None and np.asarray(var.val).size > 1}
    return stored


def compare_packages(audited: Path, reference: Path) -> dict:
    """Decode both packages' weights and compare them weight by weight."""
    import numpy as np

    from coreml_pipeline.coreml.convert import load_program, package_weights

    programs = [load_program(p) for p in (audited, reference)]
    stored = [_constexpr_inputs(p) for p in programs]
    # Numeric constants only (a program also holds strings: dtypes, pad modes).
    weights = [{name: w for name, w in package_weights(p).items() if np.asarray(w[0]).dtype.kind in "fiub"}
               for p in programs]
    if set(weights[0]) != set(weights[1]):
        only = sorted(set(weights[0]) ^ set(weights[1]))
        return {"equivalent": False, "reason": f"the packages hold different weights ({only[:3]})", "layers": {}}
    layers, worst = {}, ("", 0.0, 0.0)
    for name in sorted(weights[0]):
        a, b = (np.asarray(w[name][0], dtype=np.float64) for w in weights)
        if a.shape != b.shape:
            return {"equivalent": False, "reason": f"{name}: shapes {a.shape} and {b.shape}", "layers": layers}
        differing = int(np.count_nonzero(a != b))
        if not differing:
            continue
        norm = float(np.linalg.norm(b)) or 1.0
        row = {"values_differing": differing, "fraction_differing": differing / a.size,
               "max_abs_diff": float(np.abs(a - b).max()), "relative_l2": float(np.linalg.norm(a - b)) / norm}
        for key, value in stored[0].get(name, {}).items():
            other = stored[1].get(name, {}).get(key)
            if other is not None and other.shape == value.shape:
                row[f"{key}_differing"] = int(np.count_nonzero(value != other))
        layers[name] = row
        if row["relative_l2"] >= worst[2]:
            worst = (name, row["fraction_differing"], row["relative_l2"])
    beyond = [name for name, row in layers.items()
              if row["fraction_differing"] > TOLERANCES["max_differing_fraction"]
              or row["relative_l2"] > TOLERANCES["max_relative_l2"]]
    summary = (f"{len(layers)} of {len(weights[0])} weights differ" +
               (f"; largest: {worst[0]} ({worst[1]:.2%} of values, relative L2 {worst[2]:.2e})" if layers else ""))
    if beyond:
        return {"equivalent": False, "reason": f"beyond tolerance in {len(beyond)} weight(s), first {beyond[0]}; "
                + summary, "layers": layers}
    return {"equivalent": True, "reason": ("identical weights" if not layers else summary + ", within tolerance"),
            "layers": layers}


def first_differing_stage(recorded: dict, rebuilt: dict) -> str | None:
    """The first stage (in pipeline order) whose outputs' hashes differ between two dvc.locks."""
    def outs(lock, stage):
        return {o["path"]: o.get("md5") for o in ((lock.get("stages") or {}).get(stage) or {}).get("outs", [])}

    for stage in STAGE_ORDER:
        if outs(recorded, stage) != outs(rebuilt, stage):
            return stage
    return None


def quality_of(metrics_text: str | None) -> float | None:
    try:
        return float(json.loads(metrics_text)["quality"]) if metrics_text else None
    except (ValueError, KeyError, TypeError):
        return None


def rebuild(repo: Path, commit: str) -> dict:
    """Re-make the package from ``commit`` in a temporary worktree with a temporary DVC cache
    (nothing is restored, nothing is written to the repository's cache), through evaluate."""
    tmp = tempfile.mkdtemp(prefix="audit-rebuild-")
    tree = Path(tmp) / "rebuild"
    git("worktree", "add", "--detach", str(tree), commit, repo=repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["dvc", "config", "--local", "cache.dir", str(Path(tmp) / "cache")], cwd=tree, env=env,
                   check=True, capture_output=True)
    target = "evaluate" if "evaluate" in (lock_at(repo, commit).get("stages") or {}) else "convert"
    run = subprocess.run(["dvc", "repro", "--force", "--no-run-cache", target], cwd=tree, env=env,
                         capture_output=True, text=True)
    result = {"dir": tmp, "tree": tree, "ok": run.returncode == 0}
    if run.returncode != 0:
        result["reason"] = f"dvc repro failed in the rebuild worktree: {run.stderr.strip()[-300:]}"
        return result
    result["lock"] = yaml.safe_load((tree / "dvc.lock").read_text(encoding="utf-8")) or {}
    metrics = tree / "metrics" / "evaluate.json"
    result["quality"] = quality_of(metrics.read_text(encoding="utf-8") if metrics.is_file() else None)
    return result


def drop_rebuild(repo: Path, built: dict) -> None:
    import shutil

    git("worktree", "remove", "--force", str(built["tree"]), repo=repo, check=False)
    shutil.rmtree(built["dir"], ignore_errors=True)


def platform_differences(mine: dict | None, theirs: dict | None) -> list[str]:
    if not mine or not theirs:
        return []
    return [f"{key}: {mine.get(key)!r} here, {theirs.get(key)!r} in the recorded build"
            for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]


def signature_status(package: Path, verifier, directory: Path | None, required: bool) -> tuple[dict, list]:
    """(what the report says of the package's signature, checks to add). Present and a verifier given:
    every signing.verify check; present without one: the claimed signer, unverified."""
    from coreml_pipeline import signing

    paths = signing.signature_paths(package, directory)
    present = [p for p in paths if p.is_file()]
    if not present:
        status = {"present": False, "files": [str(p) for p in paths]}
        return status, ([("signed", False, f"no {paths[0].name} or {paths[1].name} in {paths[0].parent}: sign it with "
                          "`python -m coreml_pipeline.tools.sign` (docs/signing.md)")] if required else [])
    if verifier is None:
        if required:
            raise BadInput("--require-signature needs who must have signed: --public-key (or "
                           f"${signing.PUBLIC_KEY_ENV}), --certificate-chain, or --identity with --oidc-issuer")
        return {"present": True, "verified": False, "signer": signing.signer_of(present[0])}, []
    try:
        verified = signing.verify(package, verifier, directory)
    except signing.SigningError as exc:
        raise BadInput(str(exc)) from None
    checks = verified["checks"]
    return {"present": True, "verified": all(ok for _, ok, _ in checks), "signer": verified["signer"]}, checks


def audit(package: Path, repo: Path, do_search: bool = False, do_rebuild: bool = False, verifier=None,
          signature_dir: Path | None = None, require_signature: bool = False) -> dict:
    """The audit's result (report_text prints it). ``verifier`` (a signing.Verifier): check the signature
    files next to the package (or in ``signature_dir``); ``require_signature``: their absence fails."""
    record = provenance.read(open_package(package))
    # First: a bad key or bundle is bad input before any rebuild starts, and the files are read as found.
    signature, signature_checks = signature_status(package, verifier, signature_dir, require_signature)
    if git("rev-parse", "--git-dir", repo=repo, check=False).returncode != 0:
        raise BadInput(f"--repo {repo} is not a git repository")
    md5 = dvc_dir_hash(package)
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> bool:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    # Packages made before numerics modes existed record no runtime section and no platform.
    required = [k for k in provenance.KEYS if (k != "platform" or "runtime" in (record["config"] or {}))
                and k not in provenance.SINCE_LATER_VERSIONS]
    missing = [provenance.PREFIX + k for k in required if record[k] is None]
    check("provenance complete", not missing, f"missing: {', '.join(missing)}" if missing else "all entries present")
    actual = provenance.package_weights_sha256(package)
    check("weights hash", actual == record["weights_sha256"], f"recorded {record['weights_sha256']}, package {actual}")
    commit = record["git_commit"] or ""
    exists = bool(commit) and git("cat-file", "-e", f"{commit}^{{commit}}", repo=repo, check=False).returncode == 0
    shallow = git("rev-parse", "--is-shallow-repository", repo=repo, check=False).stdout.strip() == "true"
    if not exists and shallow:
        raise BadInput(f"commit {commit or '(none)'} is not in this shallow clone ({repo}); run "
                       "`git fetch --unshallow` and audit again")
    check("commit in repository", exists, commit if exists else f"commit {commit or '(none)'} is not in {repo}")
    recorded_at = recording_commit(repo, commit, md5) if exists else None
    # Not in a committed dvc.lock: a DVC experiment (what `dvc exp apply` puts in the workspace) may record it.
    experiments = experiment_records(repo, md5) if exists and recorded_at is None else []
    experiment = next((e for e in experiments if e["baseline"] == commit), experiments[0] if experiments else None)
    if recorded_at:
        detail = f"{md5} in dvc.lock at {recorded_at}"
    elif experiment:
        detail = (f"{md5} in the dvc.lock of DVC experiment {experiment['experiment']} ({experiment['commit'][:12]}) "
                  f"of commit {experiment['baseline']}; not in a committed dvc.lock yet")
    else:
        detail = f"no dvc.lock from {commit or '?'} on lists {md5}"
    check("dvc.lock records this package", recorded_at is not None or experiment is not None, detail)
    result: dict[str, Any] = {"package": str(package), "dvc_md5": md5, "provenance": record, "checks": checks,
                              "tolerances": TOLERANCES}
    if experiment:
        result["experiment"] = experiment
    if do_search:
        result["found_in"] = search(repo, md5)
        check("search", bool(result["found_in"]), f"{len(result['found_in'])} commit(s)/experiment(s)")
    consistent = all(c["ok"] for c in checks[:3])
    found = result.get("found_in") or []
    identical = consistent and (recorded_at is not None or any(not f["experiment"] for f in found))
    # --search finds no experiment that experiment_records missed: both read the same refs/exps tips.
    by_experiment = consistent and not identical and experiment is not None
    recorded = identical or by_experiment

    if consistent and not recorded:
        # Not a recorded package: is it a rebuild of one, made from a commit's own config and data?
        check("built from committed sources", record["git_dirty"] == "false",
              "git_dirty false" if record["git_dirty"] == "false" else "built with uncommitted changes to the sources")
        config_diff = config_differences(repo, commit, record["config"] or {})
        check("config matches the commit", not config_diff,
              "params.yaml at the commit" if not config_diff else "; ".join(config_diff[:3]))
        data_diff = data_differences(repo, commit, record["data_sha256"] or {})
        check("data matches the commit", not data_diff,
              f"{len(record['data_sha256'] or {})} file(s)" if not data_diff else "; ".join(data_diff[:3]))
        consistent = all(c["ok"] for c in checks if c["check"] not in ("dvc.lock records this package", "search"))

    comparisons: list[dict] = []
    if consistent and not recorded:
        build = recorded_build(repo, commit, record["config"] or {})
        result["recorded_build"] = {"commit": build[0], "dvc_md5": build[1]} if build else None
        with tempfile.TemporaryDirectory() as tmp:
            if build:
                reference = Path(tmp) / "recorded.mlpackage"
                why_not = fetch_recorded(repo, build[0], reference)
                if why_not is None:
                    theirs = provenance.read(open_package(reference)).get("platform")
                    result["platform_differences"] = platform_differences(record["platform"], theirs)
                    compared = compare_packages(package, reference)
                    comparisons.append({"against": f"the recorded build ({build[0][:12]})", **compared})
                else:
                    result["recorded_build"]["unavailable"] = why_not
    if do_rebuild and consistent:
        base = recorded_at or (result.get("recorded_build") or {}).get("commit") or commit
        built = rebuild(repo, base)
        try:
            if not built["ok"]:
                raise BadInput(built["reason"])
            rebuilt_pkg = built["tree"] / PACKAGE_OUT
            stage = first_differing_stage(lock_at(repo, base), built["lock"])
            recorded_quality = quality_of(git("show", f"{base}:metrics/evaluate.json", repo=repo, check=False).stdout)
            result["rebuild"] = {"commit": base, "first_differing_stage": stage, "quality": built["quality"],
                                 "recorded_quality": recorded_quality}
            if dvc_dir_hash(rebuilt_pkg) == md5:
                check("rebuild", True, "identical bytes")
            else:
                theirs = provenance.read(open_package(rebuilt_pkg)).get("platform")
                result.setdefault("platform_differences", platform_differences(record["platform"], theirs))
                compared = compare_packages(package, rebuilt_pkg)
                if built["quality"] is not None and recorded_quality is not None:
                    gap = abs(built["quality"] - recorded_quality)
                    compared["quality_difference"] = gap
                    if gap > TOLERANCES["max_quality_difference"]:
                        compared["equivalent"] = False
                        compared["reason"] += f"; quality {built['quality']} here, {recorded_quality} recorded"
                where = f"; first stage whose outputs differ: {stage}" if stage else ""
                comparisons.append({"against": "a rebuild here", **compared})
                explained = "; the platform differs" if result.get("platform_differences") else ""
                check("rebuild", compared["equivalent"] or bool(explained),
                      f"rebuilt package differs: {compared['reason']}{where}{explained}")
        finally:
            drop_rebuild(repo, built)
    for comparison in comparisons:
        if comparison["against"] != "a rebuild here":
            check(f"equivalent to {comparison['against']}", comparison["equivalent"], comparison["reason"])
    result["comparisons"] = comparisons

    result["signature"] = signature
    for name, ok, detail in signature_checks:
        check(name, ok, detail)

    beyond = any(not c["equivalent"] for c in comparisons)
    if signature_checks and not all(ok for _, ok, _ in signature_checks):
        # Whatever else holds, a package whose signature does not verify must not ship.
        verdict = "not signed" if not signature["present"] else "signature invalid"
    elif not consistent or (beyond and not result.get("platform_differences")):
        # Beyond tolerance on the recorded build's own platform: nothing but an edit explains it.
        verdict = "tampered"
    elif identical:
        verdict = "identical"  # a rebuild here on another platform may differ; the package is the recorded one
    elif by_experiment:
        verdict = "recorded by an experiment"
    elif beyond:
        verdict = "rebuilt elsewhere (different)"
    elif comparisons:
        verdict = "rebuilt elsewhere (equivalent)"
    else:
        verdict = "rebuilt elsewhere (not compared)"
    result["verdict"] = verdict
    result["exit_code"] = EXIT_CODES[verdict]
    result["ok"] = verdict == "identical"
    return result


VERDICT_TEXT = {
    "identical": "identical: byte for byte the package a dvc.lock records",
    "rebuilt elsewhere (equivalent)": "rebuilt elsewhere: not recorded, made from the commit's config and data, "
                                      "equivalent to the recorded build within tolerance",
    "rebuilt elsewhere (not compared)": "rebuilt elsewhere: not recorded, made from the commit's config and data; "
                                        "not compared (the recorded package is not in the DVC cache or a remote: "
                                        "dvc fetch, or --rebuild)",
    "rebuilt elsewhere (different)": "rebuilt elsewhere: not recorded, made from the commit's config and data on "
                                      "another platform, but its decoded weights are beyond tolerance (native "
                                      "numerics amplify the platform difference; runtime=portable avoids it)",
    "tampered": "tampered: see the FAIL lines",
    "recorded by an experiment": "recorded by a DVC experiment, not committed yet: byte for byte the package its "
                                 "dvc.lock records; commit dvc.lock (after `dvc exp apply`) to make it history",
    "signature invalid": "signature invalid: do not ship it; see the FAIL lines",
    "not signed": "not signed, and --require-signature asks for a signature",
}


def report_text(result: dict) -> str:
    record = result["provenance"]
    lines = [f"package      {result['package']}", f"dvc md5      {result['dvc_md5']}",
             f"commit       {record['git_commit']} (dirty: {record['git_dirty']})",
             f"versions     {json.dumps(record['versions'])}",
             f"platform     {json.dumps(record['platform'])}",
             f"source model {record['source_model_sha256']}",
             f"data         {json.dumps(record['data_sha256'])}",
             f"weights      {record['weights_sha256']}", "config:"]
    lines += ["  " + line for line in yaml.safe_dump(record["config"] or {}, sort_keys=False).splitlines()]
    for found in result.get("found_in", []):
        lines.append(f"made by      {found['commit']} {('experiment ' + found['experiment']) if found['experiment'] else ''}")
    if result.get("experiment"):
        e = result["experiment"]
        lines.append(f"experiment   {e['experiment']} ({e['commit'][:12]}) of commit {e['baseline']}: "
                     f"`dvc exp apply {e['experiment']}`, then `git add dvc.lock && git commit`")
    build = result.get("recorded_build")
    if build:
        lines.append(f"recorded     build {build['dvc_md5']} in dvc.lock at {build['commit']}"
                     + (f"; {build['unavailable']}" if build.get("unavailable") else ""))
    for difference in result.get("platform_differences", []):
        lines.append(f"platform     differs: {difference}")
    if "rebuild" in result and result["rebuild"].get("first_differing_stage"):
        lines.append(f"rebuild      first stage whose outputs differ from the recorded dvc.lock: "
                     f"{result['rebuild']['first_differing_stage']}")
    for comparison in result.get("comparisons", []):
        for name, row in list(comparison["layers"].items())[:8]:
            counts = ", ".join(f"{k} {v}" for k, v in row.items()
                               if k.endswith("_differing") and k not in ("values_differing", "fraction_differing"))
            lines.append(f"  {name}: {row['values_differing']} values differ ({row['fraction_differing']:.3%}), "
                         f"max abs {row['max_abs_diff']:.3g}, relative L2 {row['relative_l2']:.2e}"
                         + (f"; stored: {counts}" if counts else ""))
    signature = result.get("signature") or {}
    if signature.get("present") and not signature.get("verified") and signature.get("signer") and not any(
            c["check"] == "attestation signature" for c in result["checks"]):
        lines.append(f"signature    present, signed by {signature['signer']} (claimed); not verified: pass "
                     "--public-key (or --certificate-chain, or --identity and --oidc-issuer)")
    lines += [f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}" for c in result["checks"]]
    lines.append(f"verdict      {VERDICT_TEXT[result['verdict']]} (exit {result['exit_code']})")
    return "\n".join(lines)


def verifier_from_args(args: argparse.Namespace):
    """The signing.Verifier the flags (or $COREML_COMPRESS_PUBLIC_KEY) describe; None when none does."""
    from coreml_pipeline import signing

    if args.identity or args.oidc_issuer:
        return signing.Verifier("sigstore", identity=args.identity, oidc_issuer=args.oidc_issuer)
    if args.certificate_chain:
        return signing.Verifier("certificate", chain=tuple(Path(p) for p in args.certificate_chain))
    public_key = args.public_key or os.environ.get(signing.PUBLIC_KEY_ENV)
    return signing.Verifier("key", public_key=Path(public_key)) if public_key else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--repo", type=Path, default=Path("."), help="the git repository to check against")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--search", action="store_true", help="find every commit/experiment that produced it")
    parser.add_argument("--rebuild", action="store_true", help="re-make it from its commit here and compare")
    signed = parser.add_argument_group("signature (docs/signing.md)")
    signed.add_argument("--public-key", help="PEM public key the package must be signed with "
                        "(default: $COREML_COMPRESS_PUBLIC_KEY)")
    signed.add_argument("--certificate-chain", nargs="+", help="certificates up to a trusted root: certificate signing")
    signed.add_argument("--identity", help="Sigstore keyless: the identity that must have signed (with --oidc-issuer)")
    signed.add_argument("--oidc-issuer", help="Sigstore keyless: the identity's OIDC issuer")
    signed.add_argument("--signature-dir", type=Path, help="where PKG.sig and PKG.intoto.json are "
                        "(default: next to the package)")
    signed.add_argument("--require-signature", action="store_true", help="fail (exit 8) when the package is not signed")
    args = parser.parse_args(argv)
    try:
        result = audit(args.package, args.repo, args.search, args.rebuild, verifier_from_args(args),
                       args.signature_dir, args.require_signature)
    except (BadInput, PackageError) as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return EXIT_CODES["bad input"]
    print(json.dumps(result, indent=2, default=str) if args.json else report_text(result))
    return result["exit_code"]


if __name__ == "__main__":
    raise SystemExit(main())
