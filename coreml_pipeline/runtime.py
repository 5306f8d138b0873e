"""What every stage's command line shares: logging, seeding, error exits."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from coreml_pipeline import numerics as numerics_lib
from coreml_pipeline.config.schema import ConfigError, RuntimeConfig

log = logging.getLogger("pipeline")


def setup(stage: str, seed: int = 0, numerics: RuntimeConfig | None = None, compute: bool = True) -> logging.Logger:
    """Pin the CPU code paths (``numerics``: the runtime section; before any torch operation),
    quiet third-party chatter, seed every generator, and return the stage's logger.
    ``compute=False``: logging only, for a stage that may pass its input through; it calls
    prepare_compute itself before any torch work.

    Each stage logs ``stage=<name> start`` once per execution, so sweeps can count
    which stages really ran and which DVC restored from its cache.
    """
    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("coremltools", "transformers", "datasets", "torch", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="coremltools")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if compute:
        prepare_compute(seed, numerics)
    logger = logging.getLogger(f"pipeline.{stage}")
    logger.info("stage=%s start", stage)
    return logger


def prepare_compute(seed: int = 0, numerics: RuntimeConfig | None = None) -> None:
    """What a stage needs before torch computes: the pinned CPU code paths, quiet transformers, seeds."""
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if numerics is not None:
        numerics_lib.apply(numerics.numerics, numerics.threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warn_if_capped(logger: logging.Logger, key: str, requested: int | None, used: int, what: str) -> None:
    """One warning line when the data held fewer samples than a count asked for (never a silent clamp);
    the stage's log and, where it writes metrics, its metrics carry the number used."""
    if requested is not None and used < requested:
        logger.warning("%s=%d: %s holds only %d; using %d", key, requested, what, used, used)


def progress(iterable, what: str, total: int | None = None, unit: str = "it", file=None):
    """``iterable`` with a progress bar (count, rate, ETA) on a terminal; on a pipe, a CI log or
    DVC's captured output it adds nothing (tqdm's disable=None: off unless the stream is a TTY).
    PIPELINE_PROGRESS=0 turns it off everywhere."""
    from tqdm.auto import tqdm

    stream = file if file is not None else sys.stderr
    disable = None if os.environ.get("PIPELINE_PROGRESS", "1") != "0" else True
    return tqdm(iterable, desc=what, total=total, unit=unit, file=stream, disable=disable, leave=False,
                mininterval=1.0, dynamic_ncols=True)


@contextmanager
def timed(logger: logging.Logger, what: str):
    start = time.perf_counter()
    yield
    logger.info("%s took %.1f s", what, time.perf_counter() - start)


def existing_input(path: str) -> str:
    """argparse type of a stage's input file: a missing one (a stage run by hand before `dvc repro`
    made its inputs) is one usage error naming it, before any model loads."""
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist; `dvc repro` makes it (or pass the path of one that does)")
    return path


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run a stage's main(); a config error becomes one line on stderr and exit 2."""
    try:
        main(argv)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def write_json(data: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def partial_path(path: Path) -> Path:
    """Where an output is written before it is moved into place, so that an
    interrupted stage never leaves a half-written file under the real name
    (coremltools insists that the name still ends in .mlpackage)."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def pass_through(source: str | Path, target: str | Path) -> None:
    """A disabled optional stage's output: the input, byte for byte, moved into
    place only when complete (so DVC's cache serves everything downstream)."""
    import os
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target)
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def sha256_file(path: Path) -> str:
    """sha256 of a file; of a folder (a package's weights, an image folder), over its files'
    relative names and hashes."""
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode())
            digest.update(sha256_file(file).encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
