"""The shape the redesign promises: stage scripts only orchestrate, no stage imports another,
and dvc.yaml's code deps are exactly what each stage imports (coreml_pipeline/tools/stage_deps.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from coreml_pipeline.tools import stage_deps

ROOT = Path(__file__).resolve().parent.parent
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_deps_are_the_imports():
    assert stage_deps.differences() == []


def test_every_stage_is_a_thin_script_importing_no_other_stage():
    scripts = {stage_deps.stage_script(stage["cmd"]) for stage in STAGES.values()}
    assert scripts == {f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    for name in scripts:
        path = stage_deps.module_file(name)
        closure = stage_deps.code_closure(path)
        others = {p.name for p in closure if p.parent.name == "stages" and p not in (path, ROOT / "stages/__init__.py")}
        assert not others, f"{name} imports stage scripts {others}"
        # Orchestration only: arguments, sections, library calls, outputs.
        assert len(path.read_text().splitlines()) <= 100, name


def test_imports_inside_functions_and_registry_strings_count(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/__init__.py").write_text("")
    (tmp_path / "stages/one.py").write_text("def main():\n    from coreml_pipeline import lazy\n")
    lib = tmp_path / "coreml_pipeline"
    lib.mkdir()
    (lib / "__init__.py").write_text("")
    (lib / "lazy.py").write_text("REGISTRY = {'x': 'coreml_pipeline.named'}\n")
    (lib / "named.py").write_text("")
    (lib / "unused.py").write_text("")
    closure = {p.relative_to(tmp_path).as_posix() for p in stage_deps.code_closure(tmp_path / "stages/one.py", tmp_path)}
    assert closure == {"stages/__init__.py", "stages/one.py", "coreml_pipeline/__init__.py", "coreml_pipeline/lazy.py",
                       "coreml_pipeline/named.py"}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"one": {
        "cmd": "python -m stages.one", "deps": ["stages/one.py", "coreml_pipeline/lazy.py"]}}}))
    lines = stage_deps.differences(tmp_path)
    assert lines == ["one: dvc.yaml deps miss coreml_pipeline/__init__.py, coreml_pipeline/named.py, "
                     "stages/__init__.py (imported)"]
    # Relative imports resolve against the package, a package's own for its __init__.py.
    (lib / "sub").mkdir()
    (lib / "sub/__init__.py").write_text("from . import leaf\nfrom ..named import x\n")
    (lib / "sub/leaf.py").write_text("from .. import unused\n")
    assert stage_deps.imported_modules(lib / "sub/__init__.py", tmp_path) == {
        "coreml_pipeline.sub", "coreml_pipeline.sub.leaf", "coreml_pipeline.named"}
    assert stage_deps.imported_modules(lib / "sub/leaf.py", tmp_path) == {"coreml_pipeline", "coreml_pipeline.unused"}
