"""`python -m fraud.deploy.router`: the local canary router.

A small HTTP reverse proxy on loopback standing in for KServe's traffic split: each request goes
to the canary predictor with probability `canary_percent`/100, otherwise to the stable one. The
routing table is a JSON file (written atomically by `fraud.deploy.local`) re-read whenever it
changes, so promotion and rollback take effect without restarting the router:

    {"stable": {"version": "3", "url": "http://127.0.0.1:41234"},
     "canary": {"version": "4", "url": "http://127.0.0.1:41235"} | null,
     "canary_percent": 10}

Health checks: a background thread asks every backend's `/v2/health/live` every
`--health-interval` seconds (0.5 by default); a backend that fails one probe, or refuses a proxied
connection, gets no traffic until a probe succeeds again: its share goes to the other backend. So a
predictor that dies gets no requests within about one probe interval, and a request that found its
connection refused is sent to the other backend at once (it never reached the dead one). A request
cut off mid-flight is answered 502 (it may have been scored).

Every answer carries `x-fraud-model-version` (the version that served it). `GET /-/routes`
returns the table and each backend's health; `GET /-/healthz` answers 200 while a backend is
configured and healthy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

VERSION_HEADER = "x-fraud-model-version"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


@dataclass(frozen=True)
class Backend:
    version: str
    url: str


@dataclass(frozen=True)
class Routes:
    stable: Backend | None
    canary: Backend | None
    canary_percent: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Routes:
        def backend(item: Any) -> Backend | None:
            return Backend(str(item["version"]), str(item["url"]).rstrip("/")) if item else None

        percent = int(data.get("canary_percent", 0))
        if not 0 <= percent <= 100:
            raise ValueError(f"canary_percent must be within 0..100, got {percent}")
        return cls(backend(data.get("stable")), backend(data.get("canary")), percent)

    def choose(self, draw: float, down: frozenset[str] = frozenset()) -> Backend | None:
        """The backend for a request given a uniform draw in [0, 1); a backend whose URL is in
        `down` is skipped for the other one (None when neither is up)."""
        first, second = self.stable, self.canary
        if self.canary is not None and (self.stable is None or draw * 100 < self.canary_percent):
            first, second = self.canary, self.stable
        for backend in (first, second):
            if backend is not None and backend.url not in down:
                return backend
        return None

    def backends(self) -> list[Backend]:
        return [b for b in (self.stable, self.canary) if b is not None]


class HealthChecker:
    """Probes every routed backend's liveness endpoint; the router skips the ones that failed."""

    def __init__(self, table: RouteTable, interval_seconds: float = 0.5, path: str = "/v2/health/live") -> None:
        self.table = table
        self.interval_seconds = interval_seconds
        self.path = path
        self._down: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(interval_seconds, connect=interval_seconds))

    @property
    def down(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._down)

    def mark(self, url: str, healthy: bool) -> None:
        with self._lock:
            if healthy:
                self._down.discard(url)
            else:
                self._down.add(url)

    def probe(self, url: str) -> bool:
        try:
            return self._client.get(f"{url}{self.path}").status_code == 200
        except httpx.HTTPError:
            return False

    def run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            for backend in self.table.current().backends():
                self.mark(backend.url, self.probe(backend.url))
            self._stop.wait(max(0.0, self.interval_seconds - (time.monotonic() - started)))

    def start(self) -> HealthChecker:
        threading.Thread(target=self.run, daemon=True, name="router-health").start()
        return self

    def stop(self) -> None:
        self._stop.set()


class RouteTable:
    """The routing file, re-read when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._routes = Routes(None, None, 0)
        self._lock = threading.Lock()

    def current(self) -> Routes:
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                return Routes(None, None, 0)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                try:
                    self._routes = Routes.from_dict(json.loads(self.path.read_text()))
                    self._stamp = stamp
                except (ValueError, KeyError, TypeError) as exc:
                    print(f"router: ignoring invalid routing file {self.path}: {exc}", file=sys.stderr)
            return self._routes


def make_handler(
    table: RouteTable, client: httpx.Client, rng: random.Random, health: HealthChecker | None = None
) -> type[BaseHTTPRequestHandler]:
    rng_lock = threading.Lock()

    def down() -> frozenset[str]:
        return health.down if health is not None else frozenset()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            return None

        def setup(self) -> None:
            super().setup()
            # headers and body go out as separate writes: without this, Nagle + delayed ACKs add ~40 ms
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: Any) -> None:
            self._reply(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

        def _proxy(self) -> None:
            routes = table.current()
            unhealthy = down()
            if self.path == "/-/routes":

                def show(backend: Backend | None) -> dict[str, Any] | None:
                    return {**backend.__dict__, "healthy": backend.url not in unhealthy} if backend else None

                return self._json(
                    200,
                    {
                        "stable": show(routes.stable),
                        "canary": show(routes.canary),
                        "canary_percent": routes.canary_percent,
                    },
                )
            if self.path == "/-/healthz":
                up = any(b.url not in unhealthy for b in routes.backends())
                return self._json(200 if up else 503, {"ok": up})
            with rng_lock:
                draw = rng.random()
            backend = routes.choose(draw, unhealthy)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if backend is None:
                what = "no healthy model version" if routes.backends() else "no model version is routed"
                return self._json(503, {"error": f"{what} (local stack)"})
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            while True:
                try:
                    answer = client.request(self.command, f"{backend.url}{self.path}", content=body, headers=headers)
                    break
                except httpx.ConnectError:
                    # refused before anything was sent: mark it down and use the other backend
                    if health is not None:
                        health.mark(backend.url, False)
                    unhealthy = unhealthy | {backend.url}
                    other = routes.choose(draw, unhealthy)
                    if other is None:
                        return self._json(502, {"error": f"model version {backend.version} unreachable"})
                    backend = other
                except httpx.HTTPError as exc:
                    return self._json(
                        502, {"error": f"model version {backend.version} unreachable: {type(exc).__name__}"}
                    )
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-encoding"}}
            out[VERSION_HEADER] = backend.version
            self._reply(answer.status_code, answer.content, out)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _proxy

    return Handler


def serve(
    routes_file: Path, host: str, port: int, seed: int | None = None, health_interval: float = 0.5
) -> ThreadingHTTPServer:
    """A started router (daemon thread); call `.shutdown()` to stop it."""
    client = httpx.Client(timeout=httpx.Timeout(30.0, connect=2.0), limits=httpx.Limits(max_connections=64))
    table = RouteTable(routes_file)
    health = HealthChecker(table, health_interval).start()
    server = ThreadingHTTPServer((host, port), make_handler(table, client, random.Random(seed), health))  # noqa: S311 - seeded canary traffic split, not security
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fraud.deploy.router", description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=Path, required=True, help="routing table JSON file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=None, help="seed of the canary draw (reproducible splits)")
    parser.add_argument(
        "--health-interval", type=float, default=0.5, help="seconds between liveness probes of each backend"
    )
    args = parser.parse_args(argv)
    if not args.health_interval > 0:
        parser.error(f"--health-interval must be > 0, got {args.health_interval}")
    client = httpx.Client(timeout=httpx.Timeout(30.0, connect=2.0), limits=httpx.Limits(max_connections=64))
    table = RouteTable(args.routes)
    health = HealthChecker(table, args.health_interval)
    try:
        server = ThreadingHTTPServer(
            (args.host, args.port),
            make_handler(table, client, random.Random(args.seed), health),  # noqa: S311 - seeded canary traffic split, not security
        )
    except OSError as exc:
        print(f"router: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    server.daemon_threads = True
    health.start()
    print(f"router: listening on http://{args.host}:{args.port} (pid {os.getpid()}), routes {args.routes}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
