"""Sign what ships, and verify it: who signed a package, that not one byte changed since, and a signed
statement of how it was compressed.

Two files go next to ``<name>.mlpackage``:

- ``<name>.mlpackage.sig``: OpenSSF model-signing's Sigstore bundle over the package's files (its
  own predicate, https://model_signing/signature/v1.0: every file's sha256). Anyone can check it
  with model-signing alone: ``model_signing verify key PKG --signature PKG.sig --public_key KEY``.
- ``<name>.mlpackage.intoto.json``: a Sigstore bundle holding a DSSE-signed in-toto Statement v1
  whose subject is the package (name and the same root digest as the .sig's subject: sha256 over
  every file's digest) and whose predicate, of type PREDICATE_TYPE, says how it was compressed:
  config, commit and dirty flag, source model and data digests, calibration counts, numeric
  platform, the package's weights hash, the per-layer technique table's digest, the metrics the
  pipeline measured, and tool versions (docs/signing.md).

Signers: an elliptic-curve private key (offline; P-256/384/521, PEM, optionally encrypted), a
signing certificate with its chain, or Sigstore keyless signing (a network and an OIDC identity).

model-signing's public API signs and verifies only its own predicate. The attestation uses the
same signers and verifiers through model_signing._signing, in this module only: each signer's
``sign(payload)`` takes any object whose ``statement.pb`` is an in-toto statement, and each
verifier's ``_verify_signed_content`` checks the signature and returns the payload before
model-signing parses it as its own predicate (which would refuse ours). Writing DSSE and
certificate-chain checks by hand instead would duplicate what these classes already do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from coreml_pipeline.coreml import provenance

PREDICATE_TYPE = "https://coreml-compress.dev/attestation/compression/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
# Where a team's key comes from when no flag names it: never from params.yaml, git or DVC.
KEY_ENV = "COREML_COMPRESS_SIGNING_KEY"
PASSWORD_ENV = "COREML_COMPRESS_SIGNING_KEY_PASSWORD"
PUBLIC_KEY_ENV = "COREML_COMPRESS_PUBLIC_KEY"
CERTIFICATE_ENV = "COREML_COMPRESS_SIGNING_CERTIFICATE"
CHAIN_ENV = "COREML_COMPRESS_SIGNING_CHAIN"
SIGSTORE_TOKEN_ENV = "COREML_COMPRESS_SIGSTORE_TOKEN"


class SigningError(Exception):
    """Bad signing or verification input, or a signature that does not verify: one line."""


def signature_paths(package: Path, directory: Path | None = None) -> tuple[Path, Path]:
    """(model-signing's bundle, the compression attestation): next to ``package``, or in ``directory``."""
    folder = Path(directory) if directory is not None else Path(package).parent
    return folder / (Path(package).name + ".sig"), folder / (Path(package).name + ".intoto.json")


@dataclasses.dataclass
class Signer:
    """How to sign: ``kind`` is key, certificate or sigstore."""

    kind: str = "key"
    private_key: Path | None = None
    password: str | None = None
    certificate: Path | None = None
    chain: tuple[Path, ...] = ()
    identity_token: str | None = None
    use_staging: bool = False


@dataclasses.dataclass
class Verifier:
    """How to verify: ``kind`` is key (public_key), certificate (chain) or sigstore (identity, oidc_issuer)."""

    kind: str = "key"
    public_key: Path | None = None
    chain: tuple[Path, ...] = ()
    identity: str | None = None
    oidc_issuer: str | None = None
    use_staging: bool = False


def _read_key_file(path: Path | None, what: str) -> bytes:
    if path is None:
        env, flag = (KEY_ENV, "--key") if what == "private key" else (PUBLIC_KEY_ENV, "--public-key")
        raise SigningError(f"no {what}: set {env} to its path (or pass {flag})")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SigningError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise SigningError(f"{what} {path} cannot be read: {exc.strerror}") from None


def _check_curve(public, path: Path, what: str) -> None:
    """``public`` (the key, or a private key's public half) is on a curve model-signing signs with."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise SigningError(f"{what} {path} is a {type(public).__name__.removeprefix('_')} key; allowed: elliptic-curve "
                           "keys on P-256, P-384 or P-521 (model-signing's key signer)")
    if public.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise SigningError(f"{what} {path} is on curve {public.curve.name}; allowed: P-256, P-384, P-521")


def load_private_key(path: Path | None, password: str | None):
    """The private key at ``path``, checked: readable PEM, the right passphrase, a supported curve."""
    from cryptography.hazmat.primitives import serialization

    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password is not None else None)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        hint = f"set {PASSWORD_ENV}" if password is None else f"unset {PASSWORD_ENV}: the key is not encrypted"
        raise SigningError(f"private key {path}: {exc} ({hint})") from None
    except ValueError as exc:
        # A wrong passphrase usually fails the decryption's padding check ("Bad decrypt"); about one time in
        # 256 the garbage it decrypts to passes it and fails ASN.1 parsing instead. Either way, an encrypted
        # key that a given passphrase does not open was given the wrong passphrase.
        encrypted = b"ENCRYPTED" in data.split(b"-----END", 1)[0]
        reason = ("wrong passphrase" if password is not None and ("decrypt" in str(exc).lower() or encrypted)
                  else "not a PEM private key")
        raise SigningError(f"private key {path}: {reason} ({str(exc).splitlines()[0]})") from None
    _check_curve(key.public_key(), path, "private key")
    return key


def load_public_key(path: Path | None):
    from cryptography.hazmat.primitives import serialization

    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SigningError(f"public key {path} is not a PEM public key") from None
    _check_curve(key, path, "public key")
    return key


def key_fingerprint(public_key) -> str:
    """sha256 of the PEM public key: the hint model-signing writes into its bundles."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def package_manifest(package: Path):
    """model-signing's manifest of the package: every file's sha256, by relative name."""
    from model_signing import hashing

    return hashing.Config().hash(package)


def compression_claims(record: dict[str, Any]) -> dict[str, Any]:
    """What the predicate states of a package from its decoded provenance: every entry but the tool
    versions (the predicate's own "tools") and the weights hash (checked against the files)."""
    return {key: record[key] for key in provenance.KEYS if key not in ("versions", "weights_sha256")}


def root_digest(manifest) -> str:
    """The package's digest as model-signing's subject gives it: sha256 over every file's digest in order."""
    from model_signing._signing.signing import Payload

    return Payload(manifest).statement.pb.subject[0].digest["sha256"]


def predicate(package: Path, metrics: Path | None = None, layers: Path | None = None) -> dict[str, Any]:
    """What the attestation says of how ``package`` was compressed: its own provenance (decoded), the
    weights hash of its files, the pipeline's metrics and per-layer table when given, tool versions."""
    import model_signing

    record = _provenance_of(package)
    if record["config"] is None:
        raise SigningError(f"{package} records no provenance (coreml_compress.* metadata): sign packages this "
                           "pipeline made")
    tools = dict(record.get("versions") or {})
    tools["model-signing"] = model_signing.__version__
    out: dict[str, Any] = {
        "compression": compression_claims(record),
        "weights_sha256": provenance.package_weights_sha256(package),
        "tools": tools,
    }
    if metrics is not None:
        out["metrics"] = json.loads(Path(metrics).read_text(encoding="utf-8"))
    if layers is not None:
        out["layers_sha256"] = provenance.sha256_file(Path(layers))
    return out


def _provenance_of(package: Path) -> dict[str, Any]:
    try:
        return provenance.read(provenance.open_package(Path(package)))
    except provenance.PackageError as exc:
        raise SigningError(str(exc)) from None


class _Statement:
    """What model-signing's signers sign: an object whose ``statement.pb`` is an in-toto statement."""

    def __init__(self, subject_name: str, digest: str, body: dict[str, Any]):
        from in_toto_attestation.v1 import statement

        subject = statement.ResourceDescriptor(name=subject_name, digest={"sha256": digest}).pb
        self.statement = statement.Statement(subjects=[subject], predicate_type=PREDICATE_TYPE, predicate=body)


def check_signer(signer: Signer) -> None:
    """The signer's inputs, checked before any work (the validate stage calls it): key, passphrase,
    certificates. One SigningError line naming what is wrong."""
    _model_signing_signer(signer)


def _model_signing_signer(signer: Signer):
    from model_signing._signing import sign_certificate, sign_ec_key, sign_sigstore

    if signer.kind == "key":
        load_private_key(signer.private_key, signer.password)  # one clear line before model-signing's own errors
        return sign_ec_key.Signer(Path(signer.private_key), signer.password)
    if signer.kind == "certificate":
        load_private_key(signer.private_key, signer.password)
        for path in (signer.certificate, *signer.chain):
            _read_key_file(path, "certificate")
        try:
            return sign_certificate.Signer(Path(signer.private_key), Path(signer.certificate),
                                           [Path(p) for p in signer.chain])
        except ValueError as exc:  # not the key's certificate, or not a PEM certificate
            raise SigningError(f"certificate {signer.certificate}: {str(exc).splitlines()[0]}") from None
    if signer.kind == "sigstore":
        return sign_sigstore.Signer(identity_token=signer.identity_token, use_staging=signer.use_staging,
                                    use_ambient_credentials=signer.identity_token is None)
    raise SigningError(f"signer kind {signer.kind!r}; allowed: key, certificate, sigstore")


def sign(package: Path, signer: Signer, metrics: Path | None = None, layers: Path | None = None,
         body: dict[str, Any] | None = None, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``package``'s two signature files (signature_paths, in ``out_dir`` when given). Everything is
    checked and signed in a temporary folder first: on any error nothing is written.
    ``body``: the predicate to sign instead of the package's own (tests of a lying signer)."""
    from model_signing._signing import signing as ms_signing

    package = Path(package)
    _provenance_of(package)  # a package of this pipeline, before any key is read
    backend = _model_signing_signer(signer)
    body = body if body is not None else predicate(package, metrics, layers)
    manifest = package_manifest(package)
    sig_path, attestation_path = signature_paths(package, out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        sig_tmp, attestation_tmp = Path(tmp) / sig_path.name, Path(tmp) / attestation_path.name
        try:
            backend.sign(ms_signing.Payload(manifest)).write(sig_tmp)
            backend.sign(_Statement(package.name, root_digest(manifest), body)).write(attestation_tmp)
        except ValueError as exc:
            raise SigningError(f"signing failed: {str(exc).splitlines()[0]}") from None
        sig_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(sig_tmp, sig_path)
        shutil.move(attestation_tmp, attestation_path)
    return sig_path, attestation_path


def _model_signing_verifier(verifier: Verifier):
    from model_signing._signing import sign_certificate, sign_ec_key, sign_sigstore

    if verifier.kind == "key":
        load_public_key(verifier.public_key)
        return sign_ec_key.Verifier(Path(verifier.public_key))
    if verifier.kind == "certificate":
        for path in verifier.chain:
            _read_key_file(path, "certificate")
        return sign_certificate.Verifier([Path(p) for p in verifier.chain])
    if verifier.kind == "sigstore":
        if not verifier.identity or not verifier.oidc_issuer:
            raise SigningError("keyless verification needs --identity and --oidc-issuer (who must have signed)")
        return sign_sigstore.Verifier(identity=verifier.identity, oidc_issuer=verifier.oidc_issuer,
                                      use_staging=verifier.use_staging)
    raise SigningError(f"verifier kind {verifier.kind!r}; allowed: key, certificate, sigstore")


def _read_bundle(path: Path, kind: str):
    from model_signing._signing import sign_sigstore, sign_sigstore_pb

    try:
        return (sign_sigstore.Signature if kind == "sigstore" else sign_sigstore_pb.Signature).read(path)
    except Exception as exc:  # noqa: BLE001 - json, protobuf and sigstore-models each raise their own
        raise SigningError(f"{path} is not a Sigstore bundle ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None


def signer_of(path: Path) -> str:
    """Who the bundle says signed it, unverified: a key fingerprint or a certificate's subject."""
    material = json.loads(path.read_text(encoding="utf-8")).get("verificationMaterial", {})
    if material.get("publicKey", {}).get("hint"):
        return f"key sha256:{material['publicKey']['hint']}"
    certificate = material.get("certificate") or (material.get("x509CertificateChain", {}).get("certificates") or [{}])[0]
    if certificate.get("rawBytes"):
        import base64

        from cryptography import x509

        cert = x509.load_der_x509_certificate(base64.b64decode(certificate["rawBytes"]))
        try:  # the identity a code-signing certificate names: its subject alternative names
            names = [str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
        except x509.ExtensionNotFound:
            names = []
        return f"certificate {', '.join(names) or cert.subject.rfc4514_string()}"
    return "unknown"


def verify(package: Path, verifier: Verifier, directory: Path | None = None) -> dict[str, Any]:
    """Verify ``package`` against its two signature files (next to it, or in ``directory``). Returns {"signer", "checks": [(name, ok,
    detail)]}; a check fails on a changed, added or removed file, another signer, an attestation of
    another package or one whose predicate does not match the package's own provenance and weights."""
    from model_signing import verifying

    package = Path(package)
    sig_path, attestation_path = signature_paths(package, directory)
    checks: list[tuple[str, bool, str]] = []
    backend = _model_signing_verifier(verifier)
    for path in (sig_path, attestation_path):
        if not path.is_file():
            checks.append((f"signature file {path.name}", False, f"{path} is missing"))
    if len(checks) == 2:
        return {"signer": None, "checks": checks}
    signer = signer_of(sig_path if sig_path.is_file() else attestation_path)

    if sig_path.is_file():
        _read_bundle(sig_path, verifier.kind)  # not a bundle at all: bad input, one line
        config = verifying.Config()
        config._verifier, config._uses_sigstore = backend, verifier.kind == "sigstore"  # the verifier built above
        try:
            config.verify(package, sig_path)
            checks.append(("signature over every file", True, f"{sig_path.name}: signed by {signer}"))
        except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError, OpenSSL its chain errors
            checks.append(("signature over every file", False, f"{sig_path.name}: {_one_line(exc)}"))

    if attestation_path.is_file():
        bundle = _read_bundle(attestation_path, verifier.kind)
        try:
            payload_type, payload = backend._verify_signed_content(bundle)
            statement = json.loads(payload)
        except Exception as exc:  # noqa: BLE001 - as above: any failure to verify is a failed check
            checks.append(("attestation signature", False, f"{attestation_path.name}: {_one_line(exc)}"))
            return {"signer": signer, "checks": checks}
        checks.append(("attestation signature", True, f"{attestation_path.name}: signed by {signer}"))
        checks.extend(_check_statement(package, statement))
    return {"signer": signer, "checks": checks}


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    kind = "" if isinstance(exc, ValueError) else f"{type(exc).__name__}: "
    return (kind + text)[:400] if text else type(exc).__name__


def _check_statement(package: Path, statement: dict[str, Any]) -> list[tuple[str, bool, str]]:
    checks = []
    kind_ok = statement.get("_type") == STATEMENT_TYPE and statement.get("predicateType") == PREDICATE_TYPE
    checks.append(("attestation type", kind_ok, f"{statement.get('_type')} / {statement.get('predicateType')}"))
    if not kind_ok:
        return checks
    subjects = statement.get("subject") or [{}]
    digest = root_digest(package_manifest(package))
    signed = subjects[0].get("digest", {}).get("sha256")
    checks.append(("attestation subject is this package", len(subjects) == 1 and signed == digest,
                   f"signed {subjects[0].get('name')} sha256:{signed}; this package sha256:{digest}"))
    body = statement.get("predicate") or {}
    record = _provenance_of(package)
    mine = compression_claims(record)
    theirs = body.get("compression") or {}
    differing = [key for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]
    checks.append(("predicate matches the package's provenance", not differing,
                   "config, commit, model, data, counts, platform" if not differing
                   else "differs in " + ", ".join(differing)))
    weights = provenance.package_weights_sha256(package)
    checks.append(("predicate matches the package's weights", body.get("weights_sha256") == weights,
                   f"predicate {body.get('weights_sha256')}, package {weights}"))
    return checks


def signer_from_env(private_key: str | None, certificate: str | None = None, chain: tuple[str, ...] = (),
                    sigstore: bool = False, identity_token: str | None = None, use_staging: bool = False) -> Signer:
    """The signer the command line and environment describe (the key path from KEY_ENV when no flag)."""
    if sigstore:
        return Signer("sigstore", identity_token=identity_token, use_staging=use_staging)
    key = private_key or os.environ.get(KEY_ENV)
    password = os.environ.get(PASSWORD_ENV)
    if certificate:
        return Signer("certificate", Path(key) if key else None, password, Path(certificate), tuple(map(Path, chain)))
    return Signer("key", Path(key) if key else None, password)


def signer_from_config(kind: str) -> Signer:
    """The sign stage's signer: ``sign.signer`` names the kind, the environment holds the rest
    (COREML_COMPRESS_SIGNING_KEY/_PASSWORD/_CERTIFICATE/_CHAIN, COREML_COMPRESS_SIGSTORE_TOKEN)."""
    chain = tuple(p for p in os.environ.get(CHAIN_ENV, "").split(os.pathsep) if p)
    certificate = os.environ.get(CERTIFICATE_ENV) if kind == "certificate" else None
    if kind == "certificate" and not certificate:
        raise SigningError(f"sign.signer=certificate needs {CERTIFICATE_ENV}: the signing certificate's path")
    return signer_from_env(None, certificate, chain, kind == "sigstore", os.environ.get(SIGSTORE_TOKEN_ENV))
