"""Commands beside the pipeline: audit, sweep, report, mixed-bit recipes, experiments."""
