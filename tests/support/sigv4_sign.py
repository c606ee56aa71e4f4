#!/usr/bin/env python3
"""Sign a request as an AWS client would, with botocore's SigV4 signer.

stdin: JSON {method, url, headers: [[name, value]], body_b64, access_key,
secret_key, region, service}. stdout: JSON {headers: [[name, value]]}, the
request's headers after signing (Authorization and X-Amz-Date added).
botocore adds no X-Amz-Content-SHA256 itself (S3's signer would): pass one
in headers to sign with it. Exit 3 if botocore is not importable.
"""

import base64
import json
import sys

try:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
except ImportError:
    sys.exit(3)


def main():
    r = json.load(sys.stdin)
    req = AWSRequest(method=r["method"], url=r["url"],
                     data=base64.b64decode(r.get("body_b64", "")))
    for name, value in r.get("headers", []):
        req.headers[name] = value
    creds = Credentials(r["access_key"], r["secret_key"])
    SigV4Auth(creds, r["service"], r["region"]).add_auth(req)
    json.dump({"headers": [[k, v] for k, v in req.headers.items()]}, sys.stdout)


if __name__ == "__main__":
    main()
