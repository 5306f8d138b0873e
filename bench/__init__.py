"""Measurement scripts whose results the docs quote (not tests)."""
