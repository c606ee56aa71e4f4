#!/usr/bin/env python3
"""Writes the hand-made seeds of corpus/{proxy_tokenizer,config,relay_request}.

The client_hello seeds are real ClientHellos (openssl s_client 3.0, curl)
captured on a local listener, plus synthesized multi-record ones; they are
committed as is. Needs PyNaCl (libsodium's crypto_box_seal) for the sealed
secrets. Re-running overwrites only the files it names.
"""
import base64, json, os, random, struct

from nacl.public import PrivateKey, SealedBox

HERE = os.path.dirname(os.path.abspath(__file__))
# proxy_tokenizer.rs OPEN_KEY_HEX
KEY = PrivateKey(bytes([1] * 32))
RNG = random.Random(8)  # deterministic "random" seeds


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def sealed(secret):
    return base64.b64encode(SealedBox(KEY.public_key).encrypt(json.dumps(secret).encode())).decode()


SECRETS = {
    "inject": {"inject_processor": {"token": "tok", "dst": "X-Api-Key", "fmt": "%s"}, "no_auth": {}},
    "inject_allowed": {
        "inject_processor": {"token": "tok", "allowed_fmt": ["%s", "Bearer %s"], "allowed_dst": ["x-api-key", "authorization"]},
        "no_auth": {},
        "allowed_hosts": ["api.anthropic.com"],
    },
    "hmac": {"inject_hmac_processor": {"key": base64.b64encode(b"k" * 32).decode(), "hash": "sha256", "fmt": "%x"},
             "bearer_auth": {"digest": base64.b64encode(bytes(32)).decode()}},
    "body": {"inject_body_processor": {"token": "tok", "placeholder": "{{KEY}}"}, "no_auth": {},
             "allowed_host_pattern": "^api\\.example\\.com$"},
    "oauth2": {"oauth2_processor": {"token": {"access_token": "a", "refresh_token": "r"}},
               "fly_src_auth": {"allowed_orgs": ["org"], "allowed_apps": None}},
    "oauth2_body": {"oauth2_body_processor": {"token": {"access_token": "a"}}, "no_auth": {}},
    "sigv4": {"sigv4_processor": {"access_key": "x"}, "macaroon_auth": {"key": "x"}},
    "nulls": {"inject_processor": {"token": "t", "fmt": None, "dst": None}, "no_auth": None, "bearer_auth": {"digest": None}},
}

# ---------------------------------------------------------------- tokenizer
for name, s in SECRETS.items():
    put("proxy_tokenizer", f"json_{name}", b"\x01" + json.dumps(s).encode())
    put("proxy_tokenizer", f"open_{name}", b"\x02" + sealed(s).encode())
b = sealed(SECRETS["inject"])
put("proxy_tokenizer", "hdr_bare", b"\x00" + b.encode())
put("proxy_tokenizer", "hdr_params", b"\x00" + f'{b}; {{"dst":"X-Api-Key","fmt":"%s"}}'.encode())
put("proxy_tokenizer", "hdr_params_all", b"\x00" + f' {b} ;{{"dst":"a","fmt":"Bearer %s","msg":"m","st":"refresh","placeholder":"{{{{X}}}}"}}'.encode())
put("proxy_tokenizer", "hdr_bad_json", b"\x00" + b"abc; {\"dst\": 1}")
for i in range(6):
    put("proxy_tokenizer", f"structured_{i}", bytes([3]) + RNG.randbytes(64 + 64 * i))
put("proxy_tokenizer", "replace_0", b"\x04\x03{{K}}\x02ab" + b"x{{K}}y{{K" * 5)
for i in range(3):
    put("proxy_tokenizer", f"replace_r{i}", bytes([4]) + RNG.randbytes(100))

# ---------------------------------------------------------------- config
TOML = {
    "list": 'target = ["api.github.com=GH", "api.openai.com=OPENAI"]\nallow = ["*.pypi.org", "files.pythonhosted.org"]\ntokenizer = "http://tok:8080"\ntokenizer-auth-env = "TOK"\ninfo-port = 15480\nstate-dir = "/var/lib/x"\nca-out = "/tmp/ca.pem"\n',
    "map": '[target]\n"api.github.com" = "GH"\n"API.Anthropic.com." = "ANTHROPIC"\n\n[kernel]\nallow-cidr = ["10.0.0.0/8"]\n',
    "embedded": 'tokenizer = "embedded"\nopen-key-file = "/nonexistent/key"\nupstream-ca = ["/nonexistent/ca.pem"]\n',
    "errors": 'target = ["bad", "h=1X", "a.b=BAD", "x.com=MISSING"]\nallow = ["1.2.3.4", "*.", "a:1"]\ntokenizer = "https://x/p"\ninfo-port = 0\n',
    "unknown": 'unknown-key = 1\n',
    "permits": 'permit = ["api.openai.com POST /v1/chat/completions", "api.github.com * /**/x/*"]\n[target]\n"api.openai.com" = "OPENAI"\n"api.github.com" = { secret = "GH", permit = ["GET /repos/acme/**", "post /repos/%61cme/*/issues/"] }\n',
    "types": 'target = 3\nallow = "x"\n[kernel.nested]\na = [1, 2.5, true, 1979-05-27T07:32:00Z, {x = "y"}]\n',
}
for name, t in TOML.items():
    put("config", f"toml_{name}", b"\x00" + t.encode())
put("config", "targets_flags", b"\x01api.github.com=GH\nAPI.OPENAI.COM.=OPENAI\x00api.anthropic.com=ANTHROPIC, x.y=SEALED,")
put("config", "targets_bad", b"\x01h=\n=GH\napi.github.com=BAD\n1.2.3.4=GH\x00a.b=GH,a.b=SEALED")
for i, s in enumerate([
    "ANTHROPIC_API_KEY", "GH_TOKEN", "MY_KEY=api.example.com", "MY_KEY=api.example.com:x-api-key:%s",
    "K=api.x.com:authorization:token %s", "K=h:x-key:a:b%s:c", "K=h:x-k:%s%s", "1BAD=h", "K=h:bad header",
    "K=api.example.com:x-api-key:%s\x00dummy-value", "K=api.example.com:authorization:Bearer %s\x00Bearer dummy",
]):
    put("config", f"secret_{i}", b"\x02" + s.encode())
for i, s in enumerate([
    "10.0.0.0/8", "10.1.2.3:5432", "2001:db8::/32", "[2001:db8::/32]:443", "::1", "10.1.2.3/8",
    "[::ffff:1.2.3.4]:80", "1.2.3.4:0", "[::1", "fe80::1%eth0", " 0.0.0.0/0 ",
]):
    put("config", f"cidr_{i}", b"\x03" + s.encode())
for i, s in enumerate(["*.pypi.org", "API.GitHub.com.", "*.", "a..b", "-a.com", "x_y.example", "1.2.3.4", "*.*.x"]):
    put("config", f"host_{i}", b"\x04" + s.encode())

# ---------------------------------------------------------------- relay
# Case: alt_port(bool) h1_only(bool) Input tag (u32; 0xffffffff = Raw) + raw bytes.
RAW = b"\x00\x00\xff\xff\xff\xff"
RAW_H1ONLY = b"\x00\x01\xff\xff\xff\xff"
H = "api.anthropic.com"
reqs = {
    "get": f"GET /v1/models HTTP/1.1\r\nHost: {H}\r\nx-api-key: dummy\r\n\r\n",
    "post": f"POST /v1/messages?beta=true HTTP/1.1\r\nHost: {H}\r\nAuthorization: Bearer dummy\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{{\"model\":\"x\"}}",
    "chunked": f"POST /v1/messages HTTP/1.1\r\nHost: {H}:443\r\nx-api-key: d\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "spoof": f"GET / HTTP/1.1\r\nHost: {H}\r\nProxy-Tokenizer: AAAA; {{\"dst\":\"x\"}}\r\nProxy-Authorization: Bearer x\r\nFly-Src: instance=1\r\nConnection: keep-alive, x-api-key\r\nx-api-key: dummy\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
    "absolute": f"GET https://{H}/v1/x HTTP/1.1\r\nHost: {H}\r\n\r\n",
    "misdirected": f"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    "pipelined": f"GET /a HTTP/1.1\r\nHost: {H}\r\n\r\nGET /b HTTP/1.1\r\nHost: {H.upper()}.\r\n\r\n",
    "http10": "GET / HTTP/1.0\r\n\r\n",
    "connect": f"CONNECT {H}:443 HTTP/1.1\r\nHost: {H}:443\r\n\r\n",
    "upgrade": f"GET / HTTP/1.1\r\nHost: {H}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
}
for name, r in reqs.items():
    put("relay_request", f"raw_{name}", RAW_H1ONLY + r.encode())


def h2_frame(ty, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ty, flags]) + struct.pack(">I", stream) + payload


def lit(name, value):
    # literal header field without indexing, new name, no Huffman
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


hdrs = b"\x82\x87\x84" + b"\x01" + bytes([len(H)]) + H.encode() + lit(b"x-api-key", b"dummy")
h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"") + h2_frame(1, 0x5, 1, hdrs)
put("relay_request", "raw_h2_get", RAW + h2)
hdrs2 = b"\x83\x87\x84" + b"\x01" + bytes([len(H)]) + H.encode() + lit(b"authorization", b"Bearer d")
h2b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"") + h2_frame(1, 0x4, 1, hdrs2) + h2_frame(0, 1, 1, b"{}")
hdrs3 = b"\x82\x87\x84" + b"\x01" + bytes([len("evil.example")]) + b"evil.example"
h2b += h2_frame(1, 0x5, 3, hdrs3)
put("relay_request", "raw_h2_post_and_misdirected", RAW + h2b)
for i in range(6):
    put("relay_request", f"structured_{i}", b"\x00\x00\x00\x00\x00\x00" + RNG.randbytes(80 + 40 * i))
