"""Stage 6, sign (optional, sign.enabled): sign the package and attest how it was compressed.

Writes into --out model-signing's signature over the package's files (<package>.sig) and a
signed in-toto attestation whose predicate holds the package's provenance, weights hash, the
evaluate stage's metrics and the per-layer table's digest (<package>.intoto.json); with signing off,
only status.json saying so. The signer's secrets come from the environment, never from
params.yaml: COREML_COMPRESS_SIGNING_KEY (and _PASSWORD), COREML_COMPRESS_SIGNING_CERTIFICATE and
COREML_COMPRESS_SIGNING_CHAIN for certificates, COREML_COMPRESS_SIGSTORE_TOKEN or ambient
credentials for Sigstore (docs/signing.md).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from coreml_pipeline import runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.config.schema import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--package", required=True, type=runtime.existing_input, help="the .mlpackage to sign")
    parser.add_argument("--metrics", required=True, type=runtime.existing_input, help="the evaluate stage's metrics")
    parser.add_argument("--layers", required=True, type=runtime.existing_input, help="the per-layer table (.csv)")
    parser.add_argument("--out", required=True, help="folder for the signature, the attestation and status.json")
    args = parser.parse_args(argv)
    cfg = config.load(("sign",), args.params, whole=False)["sign"]  # off: no torch import (compose.load)
    log = runtime.setup("sign", compute=False)

    from coreml_pipeline import signing

    out = Path(args.out)
    status = {"enabled": cfg.enabled}
    if cfg.enabled:
        try:
            signer = signing.signer_from_config(cfg.signer)  # a certificate signer without its path: one line too
            with runtime.timed(log, f"sign signer={cfg.signer}"):
                # Signed into a fresh folder, then swapped in: a failure leaves the previous output whole.
                staging = out.with_name(out.name + ".signing")
                shutil.rmtree(staging, ignore_errors=True)
                sig, attestation = signing.sign(Path(args.package), signer, Path(args.metrics), Path(args.layers),
                                                out_dir=staging)
        except signing.SigningError as exc:
            raise ConfigError(f"sign.signer={cfg.signer}: {exc}") from None
        status["signer"] = signing.signer_of(sig)
        status["files"] = [sig.name, attestation.name]
        runtime.write_json(status, staging / "status.json")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        log.info("signed %s by %s: %s", args.package, status["signer"], ", ".join(status["files"]))
    else:
        shutil.rmtree(out, ignore_errors=True)
        runtime.write_json(status, out / "status.json")
        log.info("sign.enabled is false: nothing signed")


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
