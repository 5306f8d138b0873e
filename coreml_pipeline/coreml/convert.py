"""Conversion to a Core ML package, its reproducible save, and read-back: the saved
package's weights decoded and compared with the torch weights they came from."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from coreml_pipeline import runtime
from coreml_pipeline.config.schema import ConvertConfig
from coreml_pipeline.coreml import provenance as provenance_lib
from coreml_pipeline.model import COREML_PREFIX
from coreml_pipeline.techniques.precision import bounded_index_search

CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"


def to_mlmodel(network: torch.nn.Module, family, cfg: ConvertConfig):
    """Trace the family's wrapper of ``network`` (coreml_pipeline/families/; for the sentence embedder:
    BertModel + pooling on (1, seq_len) int32 inputs) and convert it."""
    import coremltools as ct

    traced, example = family.trace(network, cfg.seq_len)
    inputs = [ct.TensorType(name=name, shape=tuple(value.shape),
                            dtype=np.int32 if not value.is_floating_point() else np.float32)
              for name, value in example.items()]
    with bounded_index_search():  # an 8-bit palettized embedding would otherwise need tens of GB
        return ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name=family.output_name)],
            convert_to="mlprogram",
            # Without a target (iOS15) compression is dropped silently; before iOS18
            # grouped look-up tables and joint compression are not supported.
            minimum_deployment_target=getattr(ct.target, cfg.minimum_deployment_target),
            compute_precision=ct.precision.FLOAT16,
        )


def save_package(mlmodel, path: str | Path, provenance: dict[str, str] | None = None) -> None:
    """Save next to the target, then move into place: an interrupted save never
    leaves a half-written package under the real name."""
    path = Path(path)
    partial = runtime.partial_path(path)
    shutil.rmtree(partial, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(partial))
    make_reproducible(partial, provenance)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)


def make_reproducible(package: Path, provenance: dict[str, str] | None = None) -> None:
    """Make a saved package a pure function of the model.

    coremltools writes random UUIDs into Manifest.json, serialises protobuf
    maps in varying order, and stamps the conversion date into the metadata,
    so the same model would get a new DVC hash on every save. Here the
    identifiers are derived from the items' content, the spec is serialised
    deterministically, and the date is dropped (provenance carries the commit).
    The provenance entries and the weights' content hash are added here too.
    """
    from coremltools.proto import Model_pb2

    spec_path = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    user = spec.description.metadata.userDefined
    if CONVERSION_DATE_KEY in user:
        del user[CONVERSION_DATE_KEY]
    if provenance is not None:
        user.update(provenance)
        user[provenance_lib.PREFIX + "weights_sha256"] = provenance_lib.package_weights_sha256(package)
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"{item['path']}#{provenance_lib.sha256_file(package / 'Data' / item['path'])}")).upper()
               for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[old]: item for old, item in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n", encoding="utf-8")


def package_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def load_program(path: str | Path):
    """The MIL program of a saved package (no Core ML runtime needed)."""
    import coremltools as ct

    from coreml_pipeline.coreml.private import load_program as program_of

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    return program_of(mlmodel.get_spec(), mlmodel.weights_dir)


def _op_chain(op) -> list[str]:
    """Op types that produce a weight, innermost first (e.g. lut_to_sparse, sparse_to_dense)."""
    chain = []
    for var in op.inputs.values():
        producer = getattr(var, "op", None)
        if producer is not None and producer.op_type.startswith("constexpr"):
            chain += [t for t in _op_chain(producer) if t not in chain]  # one op may feed two inputs
    return chain + [op.op_type]


def package_weights(program) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Every weight the network consumes, by name: (value, op chain).

    coremltools' own WeightDecompressor pass turns each constexpr op into a
    const, in program order, so that chained ops (a quantized look-up table
    feeding constexpr_lut_to_dense, a per-channel scale after it) are decoded
    from their already decoded inputs. Intermediate values (a look-up table
    that feeds another constexpr op) are left out."""
    from coreml_pipeline.coreml.private import WeightDecompressor

    operations = program.functions["main"].operations
    chains, intermediate = {}, set()
    for op in operations:
        if op.op_type.startswith("constexpr"):
            chains[op.outputs[0].name] = _op_chain(op)
            intermediate |= {var.name for var in op.inputs.values() if hasattr(var, "name")}
    WeightDecompressor(op_selector=lambda op: True).apply(program)
    weights = {}
    for op in program.functions["main"].operations:
        name = op.outputs[0].name if op.outputs else None
        if op.op_type == "const" and name not in intermediate and op.outputs[0].val is not None:
            weights[name] = (np.asarray(op.outputs[0].val), chains.get(name, ["const"]))
    return weights


def find_weight(weights: dict, param_name: str, numel: int, prefix: str = "bert"):
    """The package's value of a torch parameter. The torch frontend names it
    <prefix>_<param path with _>, plus a counter when a compression chain
    needed two ops, plus a cast suffix; coremltools.optimize.coreml appends
    what it did (_sparsified, _palettized, _quantized)."""
    key = re.escape(f"{prefix}_{param_name.replace('.', '_')}")
    pattern = re.compile(rf"^{key}(_\d+)?(_cast_fp16|_to_fp16)?(_sparsified|_palettized|_quantized)*$")
    found = [w for name, w in weights.items() if pattern.match(name) and np.asarray(w[0]).size == numel]
    return found[0] if len(found) == 1 else None


def shared_weight(weights: dict, param: torch.nn.Parameter) -> str | None:
    """The name of the compressed package weight equal to ``param``, or None.
    The converter stores identical constants once (its const-deduplication pass), so a language
    model's untied head quantized exactly like its input embedding (same rows, same scales) is the
    embedding's weight in the package, under the embedding's name."""
    expected = param.detach().numpy().astype(np.float16).astype(np.float32)
    scale = float(np.abs(expected).max()) or 1.0
    for name, (value, ops) in weights.items():
        if not any(op.startswith("constexpr") for op in ops) or np.asarray(value).size != expected.size:
            continue  # only compressed weights (a constexpr chain) are shared this way
        diff = np.abs(np.asarray(value, dtype=np.float32).reshape(expected.shape) - expected).max()
        if diff <= 1e-3 * scale:
            return name
    return None


def readback(bert: torch.nn.Module, package: str | Path, prefix: str = "bert") -> dict:
    """Compare every torch parameter with its value read back from the package
    (``prefix``: the network's attribute in the traced wrapper)."""
    program = load_program(package)
    op_counts = Counter(op.op_type for op in program.functions["main"].operations if op.op_type.startswith("constexpr"))
    weights = package_weights(program)
    compressed = {f"{module_name}.{key.split('/')[1]}" for module_name, module in bert.named_modules()
                  for key, _ in module.named_buffers(recurse=False) if key.startswith(COREML_PREFIX + "/")}
    per_weight, missing, folded = {}, [], []
    for name, param in bert.named_parameters():
        found = find_weight(weights, name, param.numel(), prefix)
        stored_as = shared_weight(weights, param) if found is None and name in compressed else None
        if stored_as is not None:
            found = weights[stored_as]
        if found is None:
            # An uncompressed weight may be constant-folded into another const
            # (the float position and token-type embeddings are); a compressed
            # one stays a constexpr op and must be found.
            (missing if name in compressed else folded).append(name)
            continue
        value, ops = found
        expected = param.detach().numpy().astype(np.float16).astype(np.float32)
        diff = float(np.abs(np.asarray(value, dtype=np.float32).reshape(expected.shape) - expected).max())
        per_weight[name] = {"ops": ops, "max_abs_diff": diff}
        if stored_as is not None:
            per_weight[name]["stored_as"] = stored_as
    if missing:
        raise RuntimeError(f"compressed weights not found in the package: {missing[:4]}")
    return {
        "max_abs_diff": max(w["max_abs_diff"] for w in per_weight.values()),
        "constexpr_ops": dict(sorted(op_counts.items())),
        "weights": per_weight,
        "folded_by_converter": folded,
    }


def convert_and_check(network: torch.nn.Module, family, cfg: ConvertConfig, out: Path, log,
                      provenance: dict[str, str]) -> dict:
    with runtime.timed(log, f"ct.convert to {cfg.minimum_deployment_target} mlprogram"):
        mlmodel = to_mlmodel(network, family, cfg)
    save_package(mlmodel, out, provenance)
    with runtime.timed(log, "read back weights from the package"):
        report = readback(network, out, family.prefix)
    report["package_bytes"] = package_bytes(out)
    report["tolerance"] = cfg.readback_tolerance
    report["seq_len"] = cfg.seq_len
    if report["max_abs_diff"] > cfg.readback_tolerance:
        raise RuntimeError(f"{out}: weights read back differ from torch by {report['max_abs_diff']:.3g} "
                           f"> convert.readback_tolerance={cfg.readback_tolerance}")
    log.info("wrote %s (%d bytes); weights read back equal torch within %.3g",
             out, report["package_bytes"], report["max_abs_diff"])
    return report
