"""Numerics modes: which CPU code paths compute every float result of a stage.

``runtime.numerics: native`` lets torch, MKL and oneDNN pick the fastest code for
this CPU: AVX-512 kernels where the CPU has them, MKL's branch for this CPU,
oneDNN's JIT kernels blocked for its caches. Results then differ in the last
bits between CPUs (measured: docs/reproducibility.md), and so do the
artifacts' hashes.

``runtime.numerics: portable`` pins every one of those choices, so the same
inputs give the same bytes on any x86-64 CPU with AVX2 (Intel since 2013,
AMD since 2015), with or without AVX-512:

- ATen's vectorised kernels at the AVX2 level (``ATEN_CPU_CAPABILITY=avx2``,
  read by torch when it first dispatches a kernel);
- MKL's Conditional Numerical Reproducibility branch COMPATIBLE in strict
  mode (``mkl_cbwr_set``, exported by torch's own libtorch_cpu): the same
  instructions and reduction order on every CPU, whatever the thread count.
  It is the only branch MKL accepts on AMD CPUs (measured: AVX2 and even SSE2
  are refused there), and the slowest: its cost is in docs/reproducibility.md;
- oneDNN and NNPACK off (``torch.backends.mkldnn``, ``torch.backends.nnpack``):
  both pick their kernels from the CPU at run time and have no
  reproducibility switch;
- a fixed intra-op thread count (``runtime.threads``): ATen's parallel
  reductions split their work by the number of threads.

Everything here must run before the stage's first torch operation; ``apply``
checks that each pin took and refuses with one line when it did not. A run on a
GPU (``model.device``) is outside the promise, and its fingerprint says so.
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

from coreml_pipeline.config.schema import ConfigError

PORTABLE_ATEN_CAPABILITY = "avx2"
# MKL's CNR branches (mkl_service.h: MKL_CBWR_*) and the strict-mode flag.
CBWR_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
                 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
CBWR_STRICT = 0x10000
PORTABLE_CBWR = 3 | CBWR_STRICT
# What a portable run promises, recorded with it.
PROMISES = {
    "portable": "bit-identical on any x86-64 CPU with AVX2 (same runtime.threads)",
    "native": "bit-identical on CPUs with this CPU's instruction set and thread count only",
    "gpu": "outside the bit-identity promise (GPU kernels); compare with the audit's equivalence check",
}


@lru_cache(maxsize=1)
def _mkl() -> ctypes.CDLL | None:
    """MKL's service functions as torch ships them (statically linked into libtorch_cpu and
    exported); None where torch has no MKL (arm64, macOS)."""
    import torch

    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not library.is_file():
        return None
    handle = ctypes.CDLL(str(library))
    return handle if hasattr(handle, "mkl_serv_cbwr_set") else None


def cbwr_name(value: int) -> str:
    name = CBWR_BRANCHES.get(value & ~CBWR_STRICT, f"unknown({value})")
    return name + (",STRICT" if value & CBWR_STRICT else "")


def mkl_state() -> dict[str, str] | None:
    """MKL's version and reproducibility branch (for AUTO: the branch MKL chose for this CPU)."""
    mkl = _mkl()
    if mkl is None:
        return None
    buffer = ctypes.create_string_buffer(256)
    mkl.MKL_Get_Version_String(buffer, len(buffer))
    version = buffer.value.decode(errors="replace").split(" for ")[0].replace("Intel(R) oneAPI Math Kernel Library ", "")
    branch = mkl.mkl_serv_cbwr_get(ctypes.c_int(-1))  # MKL_CBWR_ALL: the whole setting
    state = {"version": version.strip(), "cbwr": cbwr_name(branch)}
    if branch & ~CBWR_STRICT == 2:
        state["cbwr"] += f" ({cbwr_name(mkl.mkl_serv_cbwr_get_auto_branch())} branch)"
    return state


def _refuse(what: str) -> ConfigError:
    return ConfigError(f"config error: runtime.numerics='portable' is not allowed here; {what} "
                       f"(allowed: native, or a fresh process on an x86-64 CPU with AVX2)")


def _pin_aten() -> None:
    import torch

    os.environ["ATEN_CPU_CAPABILITY"] = PORTABLE_ATEN_CAPABILITY
    chosen = torch.backends.cpu.get_cpu_capability()
    if chosen != PORTABLE_ATEN_CAPABILITY.upper():
        raise _refuse(f"torch runs its {chosen} kernels, not {PORTABLE_ATEN_CAPABILITY.upper()} (a CPU without "
                      "AVX2, or torch had already chosen in this process)")


def _pin_mkl() -> None:
    mkl = _mkl()
    if mkl is None:
        if platform.machine() in ("x86_64", "AMD64"):
            raise _refuse("torch's MKL exposes no reproducibility switch")
        return
    if mkl.mkl_serv_cbwr_get(ctypes.c_int(-1)) == PORTABLE_CBWR:
        return  # an earlier stage in this process pinned it already
    status = mkl.mkl_serv_cbwr_set(ctypes.c_int(PORTABLE_CBWR))
    if status != 0 or mkl.mkl_serv_cbwr_get(ctypes.c_int(-1)) != PORTABLE_CBWR:
        raise _refuse(f"MKL refused its {cbwr_name(PORTABLE_CBWR)} branch (status {status}: a CPU without AVX2, or "
                      "MKL had already computed in this process)")


def check_host(mode: str) -> None:
    """Refuse portable mode on a machine it cannot pin, without loading torch (the validate stage
    calls this, so the refusal comes before any stage loads a model)."""
    if mode != "portable":
        return
    if platform.machine() not in ("x86_64", "AMD64"):
        raise ConfigError(f"config error: runtime.numerics='portable' is not allowed on {platform.machine()}; "
                          "it pins x86-64 code paths (allowed there: native)")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and " avx2" not in cpuinfo.read_text(encoding="utf-8", errors="replace"):
        raise _refuse("this CPU has no AVX2")


def apply(mode: str, threads: int) -> None:
    """Pin the CPU code paths for ``mode``; call before the stage's first torch operation."""
    import torch

    if mode == "native":
        return
    check_host(mode)
    _pin_aten()
    _pin_mkl()
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    torch.set_num_threads(threads)


def fingerprint(mode: str, device: Any = "cpu") -> dict[str, Any]:
    """What chose this run's float code paths: recorded in the package and printed by the audit.

    In portable mode every entry is the same on every x86-64 CPU with AVX2, so it
    does not change the package's bytes between such machines."""
    import torch

    device = str(device)
    record: dict[str, Any] = {
        "numerics": mode,
        "machine": platform.machine(),
        "os": platform.system(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": "none",
        "onednn": "on" if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else "off",
        "nnpack": "on" if torch.backends.nnpack.is_available() and torch._C._get_nnpack_enabled() else "off",
        "threads": torch.get_num_threads(),
        "device": device,
    }
    mkl = mkl_state()
    if mkl is not None:
        record["blas"] = f"MKL {mkl['version']}, CNR {mkl['cbwr']}"
    if record["onednn"] == "on":
        record["onednn"] += f" (ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')})"
    if device.startswith("cuda"):
        record["device"] = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        record["promise"] = PROMISES["gpu"]
    else:
        record["promise"] = PROMISES[mode]
    return record
