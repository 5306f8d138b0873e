"""coreml_pipeline: the library behind the DVC stages (config, families, techniques, k-means, Core ML I/O, tools)."""

import logging as _logging

# coremltools warns on import that Core ML prediction is unavailable (Linux) and
# that this torch is newer than it was tested with. k-means worker processes
# re-import this package, so quieting it here covers them too.
_logging.getLogger("coremltools").setLevel(_logging.ERROR)

import os as _os

# coremltools' conversion and compression passes draw tqdm progress bars that
# flood CI logs; stages log their own progress. PIPELINE_PROGRESS=1 brings them back.
if _os.environ.get("PIPELINE_PROGRESS") != "1":
    _os.environ.setdefault("TQDM_DISABLE", "1")

# coremltools.optimize.torch logs every sample and layer at INFO unless told otherwise when it is
# first imported (which, in a warm stage, happened before the stage ran: coreml_pipeline/warmstart.py).
_os.environ.setdefault("COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL", "warning")
