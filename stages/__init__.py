"""The pipeline's DVC stages: one thin script per stage in dvc.yaml, run as `python -m stages.<name>`.

Each parses its paths, loads its validated params.yaml sections, calls the library
(coreml_pipeline) and writes its outputs; no stage imports another."""

from coreml_pipeline import warmstart as _warmstart

# `python -m stages.<name>` runs in a fork of a process that has imported torch, transformers and
# coremltools already (coreml_pipeline/warmstart.py; PIPELINE_WARM=0 turns it off). These stages
# import torch, so they start that process when none runs; the others use one only if it runs.
_warmstart.delegate_stage(__name__, spawn=frozenset({
    "inspect", "validate", "prune", "calibrate", "palettize", "finetune", "quantize", "convert", "baseline",
    "evaluate"}))
