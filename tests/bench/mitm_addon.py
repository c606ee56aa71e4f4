"""mitmproxy addon for `cargo xtask bench`: the same work proxypilot does.

Every request gets the real API key in `x-api-key` (replacing the dummy the
client sends); event streams are streamed, not buffered, as proxypilot does.
Large bodies are streamed by the `stream_large_bodies` option on the
command line. The key comes from the environment (BENCH_REAL_KEY).
"""

import os

from mitmproxy import http

KEY = os.environ["BENCH_REAL_KEY"]


class InjectKey:
    def request(self, flow: http.HTTPFlow) -> None:
        flow.request.headers["x-api-key"] = KEY

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ct = flow.response.headers.get("content-type", "")
        if ct.startswith("text/event-stream"):
            flow.response.stream = True


addons = [InjectKey()]
