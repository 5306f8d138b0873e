"""Audit a shipped .mlpackage: what made it, and whether that still checks out.

    python -m stages.audit artifacts/convert/model.mlpackage            # report + checks
    python -m stages.audit PKG --json                                   # the same, for machines
    python -m stages.audit PKG --search                                 # every commit / experiment that made it
    python -m stages.audit PKG --rebuild                                # re-make it and compare bytes

Checks: every provenance entry is present; the weights hash recorded in the
package matches its weight files; the recorded commit exists in this
repository; and a dvc.lock (at that commit, or at a later commit on its line
that recorded the run) lists this exact package. Exit 0 only when all pass.
Git is read through `git show`, nothing is checked out (but --rebuild, which
works in a temporary worktree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from stages import provenance

PACKAGE_OUT = "artifacts/convert/model.mlpackage"


def git(*args: str, repo: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=check)


def dvc_dir_hash(package: Path) -> str:
    """The md5 DVC records for a directory output (its `.dir` tree hash)."""
    entries = sorted(({"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(package).as_posix()}
                      for f in package.rglob("*") if f.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def user_metadata(package: Path) -> dict[str, str]:
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    return dict(spec.description.metadata.userDefined)


def lock_records(repo: Path, commit: str, md5: str) -> bool:
    """Whether dvc.lock at ``commit`` lists a convert output with this hash."""
    shown = git("show", f"{commit}:dvc.lock", repo=repo, check=False)
    if shown.returncode != 0:
        return False
    lock = yaml.safe_load(shown.stdout) or {}
    return any(out.get("md5") == md5 for stage in (lock.get("stages") or {}).values() for out in stage.get("outs", []))


def experiment_names(repo: Path) -> dict[str, str]:
    refs = git("for-each-ref", "--format=%(objectname) %(refname)", "refs/exps", repo=repo, check=False).stdout
    return {line.split()[0]: line.split()[1].rsplit("/", 1)[-1] for line in refs.splitlines() if line.strip()}


def search(repo: Path, md5: str) -> list[dict[str, str]]:
    """Every commit and DVC experiment whose dvc.lock records this package."""
    names = experiment_names(repo)
    commits = git("log", "--all", "--format=%H", "--", "dvc.lock", repo=repo, check=False).stdout.split()
    return [{"commit": c, "experiment": names.get(c, "")} for c in commits if lock_records(repo, c, md5)]


def recording_commit(repo: Path, commit: str, md5: str) -> str | None:
    """The named commit if its dvc.lock lists the package, else the first later
    commit on its line to HEAD that does (the run is committed after it ran)."""
    later = git("rev-list", "--reverse", "--ancestry-path", f"{commit}..HEAD", repo=repo, check=False).stdout.split()
    return next((c for c in [commit, *later] if lock_records(repo, c, md5)), None)


def rebuild(repo: Path, commit: str, md5: str) -> dict:
    """Re-make the package from ``commit`` in a temporary worktree, ignoring every cache."""
    cache = git("rev-parse", "--show-toplevel", repo=repo).stdout.strip() + "/.dvc/cache"
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "rebuild"
        git("worktree", "add", "--detach", str(tree), commit, repo=repo)
        try:
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
            subprocess.run(["dvc", "config", "--local", "cache.dir", cache], cwd=tree, env=env, check=True,
                           capture_output=True)
            run = subprocess.run(["dvc", "repro", "--force", "--no-run-cache", "convert"], cwd=tree, env=env,
                                 capture_output=True, text=True)
            if run.returncode != 0:
                return {"ok": False, "reason": f"dvc repro failed in the rebuild worktree: {run.stderr[-500:]}"}
            rebuilt = dvc_dir_hash(tree / PACKAGE_OUT)
        finally:
            git("worktree", "remove", "--force", str(tree), repo=repo, check=False)
    return {"ok": rebuilt == md5, "rebuilt_md5": rebuilt,
            "reason": "identical bytes" if rebuilt == md5 else f"rebuilt package differs ({rebuilt} != {md5})"}


def audit(package: Path, repo: Path, do_search: bool = False, do_rebuild: bool = False) -> dict:
    metadata = user_metadata(package)
    record = provenance.read(metadata)
    md5 = dvc_dir_hash(package)
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    missing = [provenance.PREFIX + k for k in provenance.KEYS if record[k] is None]
    check("provenance complete", not missing, f"missing: {', '.join(missing)}" if missing else "all entries present")
    actual = provenance.package_weights_sha256(package)
    check("weights hash", actual == record["weights_sha256"],
          f"recorded {record['weights_sha256']}, package {actual}")
    commit = record["git_commit"] or ""
    exists = bool(commit) and git("cat-file", "-e", f"{commit}^{{commit}}", repo=repo, check=False).returncode == 0
    check("commit in repository", exists, commit if exists else f"commit {commit or '(none)'} is not in {repo}")
    recorded_at = recording_commit(repo, commit, md5) if exists else None
    check("dvc.lock records this package", recorded_at is not None,
          f"{md5} in dvc.lock at {recorded_at}" if recorded_at else f"no dvc.lock from {commit or '?'} on lists {md5}")
    result = {"package": str(package), "dvc_md5": md5, "provenance": record, "checks": checks}
    if do_search:
        result["found_in"] = search(repo, md5)
        check("search", bool(result["found_in"]), f"{len(result['found_in'])} commit(s)/experiment(s)")
    if do_rebuild:
        outcome = rebuild(repo, recorded_at, md5) if recorded_at else {"ok": False, "reason": "no commit to rebuild"}
        result["rebuild"] = outcome
        check("rebuild", outcome["ok"], outcome["reason"])
    result["ok"] = all(c["ok"] for c in checks)
    return result


def report_text(result: dict) -> str:
    record = result["provenance"]
    lines = [f"package      {result['package']}", f"dvc md5      {result['dvc_md5']}",
             f"commit       {record['git_commit']} (dirty: {record['git_dirty']})",
             f"versions     {json.dumps(record['versions'])}",
             f"source model {record['source_model_sha256']}",
             f"data         {json.dumps(record['data_sha256'])}",
             f"weights      {record['weights_sha256']}", "config:"]
    lines += ["  " + line for line in yaml.safe_dump(record["config"] or {}, sort_keys=False).splitlines()]
    for found in result.get("found_in", []):
        lines.append(f"made by      {found['commit']} {('experiment ' + found['experiment']) if found['experiment'] else ''}")
    lines += [f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}" for c in result["checks"]]
    lines.append("audit passed" if result["ok"] else "audit FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--repo", type=Path, default=Path("."), help="the git repository to check against")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--search", action="store_true", help="find every commit/experiment that produced it")
    parser.add_argument("--rebuild", action="store_true", help="re-make it from its commit and compare bytes")
    args = parser.parse_args(argv)
    if not (args.package / "Manifest.json").is_file():
        print(f"audit: {args.package} is not an .mlpackage (no Manifest.json)", file=sys.stderr)
        return 2
    result = audit(args.package, args.repo, args.search, args.rebuild)
    print(json.dumps(result, indent=2) if args.json else report_text(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
