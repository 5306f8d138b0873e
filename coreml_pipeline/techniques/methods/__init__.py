"""The compression methods, one registered class each (techniques/registry.py), per params.yaml section.

These modules are light on purpose: the validate stage imports all four to check a
whole params.yaml in a fraction of a second, and each ``apply`` imports the heavy
algorithm (torch, coremltools) from its technique module only when it runs, as
Olive's passes do.
"""
