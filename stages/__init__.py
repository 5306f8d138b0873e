"""The pipeline's DVC stages: one thin script per stage in dvc.yaml, run as `python -m stages.<name>`.

Each parses its paths, loads its validated params.yaml sections, calls the library
(coreml_pipeline) and writes its outputs; no stage imports another."""
