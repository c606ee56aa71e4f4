#!/usr/bin/env python3
"""Verify a received SigV4 request as an AWS service would, with botocore.

The fake S3 of tests/src/fake_s3.rs runs this for every request it gets.
stdin: JSON {method, url (https://authority/path?query as received),
headers: [[name, value]] as received (with host), body_b64, access_key,
secret_key, region, service}: the real keys and the scope the service
expects. stdout: JSON {ok, reason, signed_headers, credential}.

Like S3 it checks, in order: one SigV4 Authorization; the real access key;
the scope's region and service; X-Amz-Date matching the scope's date;
every signed header present; a hex X-Amz-Content-SHA256 matching the body;
then the signature, recomputed by botocore over exactly the signed headers
with the real secret key (the clock is not checked). Exit 3 if botocore is
not importable.
"""

import base64
import hashlib
import hmac
import json
import re
import sys

try:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
except ImportError:
    sys.exit(3)

AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]*)/(\d{8})/([^/]*)/([^/]*)/aws4_request, "
    r"SignedHeaders=([a-z0-9;_-]+), Signature=([0-9a-f]{64})")


def verdict(ok, reason, signed="", credential=""):
    json.dump({"ok": ok, "reason": reason, "signed_headers": signed,
               "credential": credential}, sys.stdout)


def main():
    r = json.load(sys.stdin)
    headers = [(k.lower(), v) for k, v in r["headers"]]
    body = base64.b64decode(r.get("body_b64", ""))

    def values(name):
        return [v for k, v in headers if k == name]

    auth = values("authorization")
    if len(auth) != 1:
        return verdict(False, f"expected one Authorization header, got {len(auth)}")
    m = AUTH.fullmatch(auth[0])
    if not m:
        return verdict(False, "Authorization is not AWS4-HMAC-SHA256 Credential=..., "
                              "SignedHeaders=..., Signature=...")
    access_key, date, region, service, signed, signature = m.groups()
    credential = f"{access_key}/{date}/{region}/{service}"
    if access_key != r["access_key"]:
        return verdict(False, "InvalidAccessKeyId: not the real access key", signed, credential)
    if (region, service) != (r["region"], r["service"]):
        return verdict(False, f"scope {region}/{service}, expected {r['region']}/{r['service']}",
                       signed, credential)
    amz_date = values("x-amz-date")
    if len(amz_date) != 1 or amz_date[0][:8] != date:
        return verdict(False, "X-Amz-Date missing or not the scope's date", signed, credential)
    names = signed.split(";")
    present = {k for k, _ in headers}
    missing = [n for n in names if n not in present]
    if missing:
        return verdict(False, f"signed headers not in the request: {missing}", signed, credential)
    content_sha = values("x-amz-content-sha256")
    if content_sha and re.fullmatch(r"[0-9a-f]{64}", content_sha[0]) \
            and hashlib.sha256(body).hexdigest() != content_sha[0]:
        return verdict(False, "XAmzContentSHA256Mismatch", signed, credential)

    req = AWSRequest(method=r["method"], url=r["url"], data=body)
    for k, v in headers:
        if k in names:
            req.headers[k] = v  # appends: repeated headers stay repeated
    req.context["timestamp"] = amz_date[0]
    signer = SigV4Auth(Credentials(r["access_key"], r["secret_key"]), service, region)
    if signer.signed_headers(signer.headers_to_sign(req)) != signed:
        return verdict(False, "SignedHeaders lists headers a signer would not sign",
                       signed, credential)
    canonical = signer.canonical_request(req)
    expected = signer.signature(signer.string_to_sign(req, canonical), req)
    if not hmac.compare_digest(expected, signature):
        return verdict(False, "SignatureDoesNotMatch", signed, credential)
    return verdict(True, "verified", signed, credential)


if __name__ == "__main__":
    main()
