"""Progress on long loops (issue 18.5): a bar with count, rate and ETA on a terminal (tqdm), nothing
on a pipe or in CI logs (DVC's captured output included), nothing at all with PIPELINE_PROGRESS=0."""

from __future__ import annotations

import io

from coreml_pipeline.runtime import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_shows_count_rate_and_eta(monkeypatch):
    monkeypatch.delenv("PIPELINE_PROGRESS", raising=False)
    stream = Terminal()
    assert list(progress(range(3), "sensitivity", unit="sample", file=stream)) == [0, 1, 2]
    shown = stream.getvalue()
    # the bar's first frame: count of total, elapsed<remaining (the ETA), rate; cleared when done (leave=False)
    assert "sensitivity:" in shown and "0/3 [00:00<" in shown and "sample/s]" in shown


def test_a_pipe_or_a_ci_log_gets_nothing(monkeypatch):
    monkeypatch.delenv("PIPELINE_PROGRESS", raising=False)
    stream = io.StringIO()
    assert list(progress(iter("abc"), "k-means", total=3, file=stream)) == ["a", "b", "c"]
    assert stream.getvalue() == ""


def test_pipeline_progress_0_silences_a_terminal(monkeypatch):
    monkeypatch.setenv("PIPELINE_PROGRESS", "0")
    stream = Terminal()
    assert list(progress(range(2), "embeddings", file=stream)) == [0, 1]
    assert stream.getvalue() == ""
