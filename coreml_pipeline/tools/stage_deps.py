"""The code each DVC stage runs, derived from its imports, against its `deps` in dvc.yaml.

A stage's code dependencies are its script plus every project module it can
import, transitively, including imports inside functions and modules named in
strings, and every module of a package that lists its own modules
(`pkgutil.iter_modules(__path__)`: the family registry imports the family a
config names, and all of them to say what is allowed). DVC reruns a stage
when a dependency changes, so a module missing from `deps` lets a stale output
pass as current, and an extra one reruns a stage for nothing.

    python -m coreml_pipeline.tools.stage_deps          # what each stage's deps should list
    python -m coreml_pipeline.tools.stage_deps --check  # exit 1 and name the differences
    python -m coreml_pipeline.tools.stage_deps --write  # rewrite the code deps in dvc.yaml

Written by hand: DVC tracks files, not imports, and no tool here maps one to the other.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("coreml_pipeline", "stages")
MODULE_NAME = re.compile(r"^(?:%s)(?:\.\w+)+$" % "|".join(PACKAGES))  # dotted: a module path, not a word


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of project module ``name`` (a package's __init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _with_parents(name: str, root: Path) -> set[Path]:
    """The module's file and the __init__.py of every package above it (Python runs them all)."""
    parts = name.split(".")
    files = {module_file(".".join(parts[:i]), root) for i in range(1, len(parts) + 1)}
    return {f for f in files if f is not None}


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Project modules ``path`` imports anywhere in its body, or names in a string."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = path.relative_to(root).with_suffix("").parts
    # The package relative imports resolve against: a package's own name for its __init__.py.
    package = ".".join(parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module or ""
            names.add(base)
            # `from package import module` imports a module, not only a name.
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.match(node.value):
            names.add(node.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "iter_modules"
              and any(isinstance(arg, ast.Name) and arg.id == "__path__" for arg in node.args)):
            names.update(f"{package}.{module.stem}" for module in path.parent.glob("*.py")
                         if module.name != "__init__.py")
    return {name for name in names if name.split(".")[0] in PACKAGES and module_file(name, root)}


def code_closure(script: Path, root: Path = ROOT) -> set[Path]:
    """Every project file the script can run: itself and its imports, transitively."""
    seen: set[Path] = set()
    # `python -m stages.<name>` runs stages/__init__.py first.
    todo = [script, *_with_parents(".".join(script.relative_to(root).with_suffix("").parts), root)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path, root):
            todo.extend(_with_parents(name, root) - seen)
    return seen


def stage_script(cmd: str) -> str | None:
    match = re.search(r"python -m (stages\.\w+)", cmd)
    return match.group(1) if match else None


def expected_deps(root: Path = ROOT) -> dict[str, list[str]]:
    """Per stage, its code files as dvc.yaml should list them: a folder when every module in
    it is needed (its __pycache__ aside), else the files."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, stage in stages.items():
        script = stage_script(stage["cmd"])
        if script is None:
            continue
        files = {p.relative_to(root).as_posix() for p in code_closure(module_file(script, root), root)}
        for folder in sorted({str(Path(f).parent) for f in files}, key=len):
            if folder in files:
                continue
            whole = {p.relative_to(root).as_posix() for p in (root / folder).glob("*.py")}
            nested = any(f.startswith(folder + "/") and str(Path(f).parent) != folder for f in files)
            if whole and whole <= files and not nested:
                files = (files - whole) | {folder}
        out[name] = sorted(files, key=lambda f: (not f.startswith("stages/"), f))
    return out


def _files(paths: set[str], root: Path) -> set[str]:
    """dvc.yaml deps as files: a folder stands for every module under it."""
    out = set()
    for path in paths:
        folder = root / path
        out |= ({p.relative_to(root).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}
                if folder.is_dir() else {path})
    return out


def listed_deps(root: Path = ROOT) -> dict[str, set[str]]:
    """Per stage, the code paths its dvc.yaml deps list (under stages/ or the library)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: {d for d in stage.get("deps", []) if d.split("/")[0] in PACKAGES}
            for name, stage in stages.items() if stage_script(stage["cmd"])}


def differences(root: Path = ROOT) -> list[str]:
    """One line per stage whose dvc.yaml code deps differ from its imports (compared file by file)."""
    expected, listed = expected_deps(root), listed_deps(root)
    lines = []
    for name, paths in expected.items():
        want, have = _files(set(paths), root), _files(listed[name], root)
        if want - have:
            lines.append(f"{name}: dvc.yaml deps miss {', '.join(sorted(want - have))} (imported)")
        if have - want:
            lines.append(f"{name}: dvc.yaml deps list {', '.join(sorted(have - want))} (not imported)")
    return lines


def write(root: Path = ROOT) -> None:
    """Replace each stage's code deps in dvc.yaml (in place, comments and other deps kept)."""
    expected = expected_deps(root)
    path = root / "dvc.yaml"
    out, stage, in_deps, inserted = [], None, False, False
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if match := re.match(r"^  (\w+):\s*$", line):
            stage, in_deps = match.group(1), False
        if re.match(r"^    deps:\s*$", line):
            in_deps, inserted = True, False
            out.append(line)
            continue
        if in_deps:
            if dep := re.match(r"^      - (\S+)", line):
                if dep.group(1).split("/")[0] in PACKAGES:
                    if not inserted and stage in expected:
                        out.extend(f"      - {f}\n" for f in expected[stage])
                        inserted = True
                    continue
            elif not line.startswith("      #"):
                in_deps = False
        out.append(line)
    path.write_text("".join(out), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with dvc.yaml; exit 1 on a difference")
    parser.add_argument("--write", action="store_true", help="rewrite the code deps of every stage in dvc.yaml")
    args = parser.parse_args(argv)
    if args.write:
        write()
        return 0
    if args.check:
        lines = differences()
        print("\n".join(lines) or "dvc.yaml lists exactly the code every stage imports")
        return 1 if lines else 0
    for name, files in expected_deps().items():
        print(f"{name}:\n" + "".join(f"  - {f}\n" for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
