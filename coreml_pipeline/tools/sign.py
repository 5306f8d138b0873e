"""Sign a package: model-signing's signature over its files plus a signed in-toto attestation of how
it was compressed, written next to it (or into --out-dir).

    COREML_COMPRESS_SIGNING_KEY=~/keys/release.pem python -m coreml_pipeline.tools.sign artifacts/convert/model.mlpackage
    python -m coreml_pipeline.tools.sign PKG --key release.pem                      # passphrase: COREML_COMPRESS_SIGNING_KEY_PASSWORD
    python -m coreml_pipeline.tools.sign PKG --key leaf.key --certificate leaf.pem --chain ca.pem
    python -m coreml_pipeline.tools.sign PKG --sigstore                             # keyless: needs a network and an OIDC identity

Keys never go into params.yaml, git or DVC: a path on the command line or in the environment.
Verify with `python -m coreml_pipeline.tools.audit PKG --public-key release.pub` (docs/signing.md).
Exit 0 when signed; 2 with one line on bad input (nothing is written next to the package).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coreml_pipeline import signing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--key", help=f"PEM elliptic-curve private key (default: ${signing.KEY_ENV})")
    parser.add_argument("--certificate", help="signing certificate (PEM) for the key: certificate-based signing")
    parser.add_argument("--chain", nargs="*", default=[], help="certificates up to the root (PEM)")
    parser.add_argument("--sigstore", action="store_true", help="Sigstore keyless signing (network, OIDC identity)")
    parser.add_argument("--identity-token", help="an OIDC token for --sigstore (default: ambient credentials)")
    parser.add_argument("--staging", action="store_true", help="Sigstore's staging instance (testing only)")
    parser.add_argument("--metrics", type=Path, help="the evaluate stage's metrics to attest (metrics/evaluate.json)")
    parser.add_argument("--layers", type=Path, help="the per-layer technique table to attest (metrics/layers.csv)")
    parser.add_argument("--out-dir", type=Path, help="where the two files go (default: next to the package)")
    args = parser.parse_args(argv)
    try:
        for flag, path in (("--metrics", args.metrics), ("--layers", args.layers)):
            if path is not None and not path.is_file():
                raise signing.SigningError(f"{flag} {path} does not exist")
        signer = signing.signer_from_env(args.key, args.certificate, tuple(args.chain), args.sigstore,
                                         args.identity_token, args.staging)
        written = signing.sign(args.package, signer, args.metrics, args.layers, out_dir=args.out_dir)
    except signing.SigningError as exc:
        print(f"sign: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
