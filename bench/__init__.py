"""Measurement scripts whose results README quotes (not tests)."""
