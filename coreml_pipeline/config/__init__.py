"""Composition of the Hydra config into params.yaml (compose), and its validation (schema)."""
