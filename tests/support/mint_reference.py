#!/usr/bin/env python3
"""The independent reference for the token-minting processors' tests
(tests/unprivileged/tokenizer_mint.rs): keys made by the `cryptography`
package, secrets written by hand in superfly/tokenizer's JSON and sealed by
PyNaCl, and JWT signatures checked by `cryptography`.

    mint_reference.py gen SEAL_KEY_HEX    -> JSON list of cases on stdout
    mint_reference.py verify              <- {"jwt","public_pem"} on stdin
                                          -> {"header","claims"} on stdout,
                                             exit 1 if the signature is bad
"""

import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from nacl.public import PublicKey, SealedBox

PEM = serialization.Encoding.PEM
PKCS8 = serialization.PrivateFormat.PKCS8
TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL  # PKCS#1 RSA, SEC1 EC
NOENC = serialization.NoEncryption()

TOKEN_URL = "https://oauth.example.com/token"
HOSTS = ["oauth.example.com"]


def b64(b):
    return base64.b64encode(b).decode()


def public_pem(key):
    return key.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def gen(seal_key_hex):
    box = SealedBox(PublicKey(bytes.fromhex(seal_key_hex)))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    gh_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    digest = b64(hashlib.sha256(b"proxy-pass").digest())
    cases = [
        ("jwt_rsa_pkcs1", "RS256", rsa_key, TRADITIONAL,
         {"email": "sa@proj.iam.gserviceaccount.com", "sub": "", "scopes": "scope.a scope.b",
          "token_url": TOKEN_URL}, {"no_auth": {}}, None),
        ("jwt_p256_sec1_bearer_auth", "ES256", p256, TRADITIONAL,
         {"email": "sa2@example.com", "sub": "user@example.com", "scopes": "s1",
          "token_url": TOKEN_URL}, {"bearer_auth": {"digest": digest}}, None),
        ("jwt_p384_pkcs8_params", "ES384", p384, PKCS8,
         {"email": "sa3@example.com", "sub": "default@example.com", "scopes": "default",
          "token_url": TOKEN_URL}, {"no_auth": {}},
         {"sub": "param@example.com", "scopes": "param.scope"}),
        ("jwt_ed25519_pkcs8", "EdDSA", ed, PKCS8,
         {"email": "sa4@example.com", "sub": "", "scopes": "", "token_url": TOKEN_URL},
         {"no_auth": {}}, None),
    ]
    out = []
    for name, alg, key, fmt, fields, auth, params in cases:
        pem = key.private_bytes(PEM, fmt, NOENC)
        secret = {"jwt_processor": dict(private_key=b64(pem), **fields), **auth,
                  "allowed_hosts": HOSTS}
        out.append({"name": name, "kind": "jwt", "alg": alg, "public_pem": public_pem(key),
                    "fields": fields, "params": params, "secret": secret})
    out.append({"name": "client_credentials", "kind": "client_credentials",
                "fields": {"client_id": "cid-1", "client_secret": "cc-secret-value-123",
                           "token_url": TOKEN_URL, "scopes": "read write"},
                "params": None,
                "secret": {"client_credentials_processor": {
                    "client_id": "cid-1", "client_secret": "cc-secret-value-123",
                    "token_url": TOKEN_URL, "scopes": "read write"},
                    "no_auth": {}, "allowed_hosts": HOSTS, "allowed_host_pattern": "example"}})
    gh_pem = gh_key.private_bytes(PEM, PKCS8, NOENC)
    out.append({"name": "github_app", "kind": "github_app", "alg": "RS256",
                "public_pem": public_pem(gh_key),
                "fields": {"app_id": "12345", "installation_id": "678", "token_url": ""},
                "params": None,
                "secret": {"github_app_processor": {"private_key": b64(gh_pem), "app_id": "12345",
                                                    "installation_id": "678", "token_url": ""},
                           "bearer_auth": {"digest": digest},
                           "allowed_hosts": ["api.github.com", "uploads.github.com"]}})
    for case in out:
        text = json.dumps(case["secret"], separators=(",", ":"))
        case["sealed"] = b64(box.encrypt(text.encode()))
    json.dump(out, sys.stdout)


def unb64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify():
    req = json.load(sys.stdin)
    h, c, s = req["jwt"].split(".")
    header, claims, sig = json.loads(unb64url(h)), json.loads(unb64url(c)), unb64url(s)
    msg = (h + "." + c).encode()
    key = serialization.load_pem_public_key(req["public_pem"].encode())
    alg = header["alg"]
    try:
        if alg == "RS256":
            assert isinstance(key, rsa.RSAPublicKey)
            key.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
        elif alg in ("ES256", "ES384"):
            n = len(sig) // 2
            der = encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big"))
            key.verify(der, msg, ec.ECDSA(hashes.SHA256() if alg == "ES256" else hashes.SHA384()))
        elif alg == "EdDSA":
            key.verify(sig, msg)
        else:
            raise InvalidSignature("unknown alg " + alg)
    except (InvalidSignature, AssertionError) as e:
        print("bad signature: %r" % e, file=sys.stderr)
        sys.exit(1)
    json.dump({"header": header, "claims": claims}, sys.stdout)


if __name__ == "__main__":
    if sys.argv[1] == "gen":
        gen(sys.argv[2])
    else:
        verify()
