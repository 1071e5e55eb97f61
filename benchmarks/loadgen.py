"""HTTP load generators for the scoring benchmarks (loopback only, bounded in count and time).

Two generators, used identically for every compared server:

* `run_wrk` - closed loop at saturation: Debian's `wrk` (C, epoll) with a Lua script that POSTs one
  fixed JSON body on `connections` keep-alive connections for `duration_s`. Reports requests/s,
  latency percentiles (wrk's `--latency` histogram), non-2xx/socket errors, and wrk's own CPU time
  (from the child's rusage), so the client's share of the 2 cores is known.
* `run_open_loop` - open loop at a fixed offered rate: an asyncio generator that schedules request
  i at `t0 + i / rate` regardless of earlier responses and measures each latency from its
  *scheduled* send time, so queueing in the client or the server is counted (coordinated-omission
  corrected, like wrk2). It speaks HTTP/1.1 keep-alive directly over `asyncio.Protocol` with
  pre-encoded request bytes (httpx costs ~10x more client CPU per request, which on a 2-core
  machine would be taken from the server under test). Connections are pooled and opened on
  demand up to `max_connections`; a request that finds none free waits, and that wait counts.

Both refuse non-loopback targets.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

WRK_MISSING = (
    "wrk is not installed: the closed-loop (saturation) benchmark needs Debian's wrk "
    "(apt-get update && apt-get install -y wrk); see benchmarks/README.md"
)


class LoadGenError(RuntimeError):
    """The load generator cannot run (missing tool, bad target) or produced no usable result."""


def _loopback_target(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise LoadGenError(f"target must be http://host:port/path, got {url!r}")
    host = parts.hostname
    address = socket.gethostbyname(host)
    if not ipaddress.ip_address(address).is_loopback:
        raise LoadGenError(f"refusing to load-test {host} ({address}): only loopback targets are allowed")
    return address, parts.port, parts.path or "/"


def _cpu_cores() -> int:
    return len(os.sched_getaffinity(0))


# --- closed loop: wrk -----------------------------------------------------------------------------
@dataclass(frozen=True)
class WrkResult:
    connections: int
    threads: int
    duration_s: float
    requests: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int  # socket errors + non-2xx/3xx responses
    client_cpu_s: float
    #: client CPU time / wall time, in cores (1.0 = one full core)
    client_cpu_cores: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_WRK_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body_path}", "rb")
wrk.body = f:read("*a")
f:close()
"""

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_duration_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise LoadGenError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk_output(output: str) -> dict[str, float]:
    """Requests, requests/s, p50/p90/p99 (ms) and error count from `wrk --latency` output."""
    result: dict[str, float] = {}
    for pct, key in (("50", "p50_ms"), ("90", "p90_ms"), ("99", "p99_ms")):
        match = re.search(rf"^\s+{pct}%\s+(\S+)\s*$", output, re.MULTILINE)
        if not match:
            raise LoadGenError(f"wrk output lacks the {pct}% latency line:\n{output}")
        result[key] = _wrk_duration_ms(match.group(1))
    match = re.search(r"^\s*(\d+) requests in ", output, re.MULTILINE)
    if not match:
        raise LoadGenError(f"wrk output lacks the request count:\n{output}")
    result["requests"] = int(match.group(1))
    match = re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.MULTILINE)
    if not match:
        raise LoadGenError(f"wrk output lacks Requests/sec:\n{output}")
    result["requests_per_s"] = float(match.group(1))
    errors = 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if match:
        errors += sum(int(g) for g in match.groups())
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if match:
        errors += int(match.group(1))
    result["errors"] = errors
    return result


def run_wrk(url: str, body: bytes, *, connections: int, duration_s: float, threads: int = 1) -> WrkResult:
    """Closed-loop saturation run of `wrk` against `url` (POST `body`)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise LoadGenError(WRK_MISSING)
    _loopback_target(url)
    with tempfile.TemporaryDirectory(prefix="fraud-wrk-") as tmp:
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(_WRK_LUA.format(body_path=body_path))
        seconds = max(1, round(duration_s))
        command = [
            wrk,
            f"-t{threads}",
            f"-c{max(connections, threads)}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            url,
        ]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if process.stdout is None:  # stdout=PIPE above
            raise LoadGenError("wrk started without an output pipe")
        output = process.stdout.read().decode("utf-8", "replace")
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
    if process.returncode != 0:
        raise LoadGenError(f"wrk exited with status {process.returncode}:\n{output}")
    parsed = parse_wrk_output(output)
    cpu = usage.ru_utime + usage.ru_stime
    return WrkResult(
        connections=connections,
        threads=threads,
        duration_s=seconds,
        requests=int(parsed["requests"]),
        requests_per_s=parsed["requests_per_s"],
        p50_ms=parsed["p50_ms"],
        p90_ms=parsed["p90_ms"],
        p99_ms=parsed["p99_ms"],
        errors=int(parsed["errors"]),
        client_cpu_s=cpu,
        client_cpu_cores=cpu / wall,
    )


# --- open loop: asyncio ---------------------------------------------------------------------------
@dataclass
class OpenLoopResult:
    offered_rate: float
    duration_s: float
    sent: int
    completed: int
    errors: int
    achieved_rate: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    #: largest lag between a request's scheduled and actual send time (client saturation indicator)
    max_send_lag_ms: float
    connections_opened: int
    client_cpu_s: float
    client_cpu_cores: float
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection answering one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection closed: {exc}"))

    @property
    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._try_complete()

    def _try_complete(self) -> None:
        if self._waiter is None or self._waiter.done():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self._waiter.set_exception(ConnectionError(f"bad status line {lines[0]!r}"))
            return
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
            elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                self._waiter.set_exception(ConnectionError("chunked responses are not supported"))
                return
        if length is None:
            self._waiter.set_exception(ConnectionError("response without Content-Length"))
            return
        total = end + 4 + length
        if len(self._buffer) < total:
            return
        payload = bytes(self._buffer[end + 4 : total])
        del self._buffer[:total]
        self._waiter.set_result((status, payload))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.transport is None:
            raise ConnectionError("request() before the connection was made")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await self._waiter
        finally:
            self._waiter = None


def encode_post(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _open_loop(
    url: str, bodies: Sequence[bytes], rate: float, duration_s: float, max_connections: int, timeout_s: float
) -> OpenLoopResult:
    host, port, path = _loopback_target(url)
    raws = [encode_post(host, port, path, body) for body in bodies]
    loop = asyncio.get_running_loop()
    total = max(1, int(rate * duration_s))
    latencies = np.full(total, np.nan)
    idle: list[_HttpConnection] = []
    opened = 0
    slots = asyncio.Semaphore(max_connections)
    errors: list[str] = []
    max_lag = 0.0

    async def one(index: int, scheduled: float) -> None:
        nonlocal opened
        try:
            await asyncio.wait_for(slots.acquire(), max(0.0, scheduled + timeout_s - time.perf_counter()))
        except TimeoutError:
            latencies[index] = timeout_s  # censored: waited the whole timeout for a connection slot
            errors.append(f"no free connection within {timeout_s:g}s (client queue)")
            return
        try:
            await send(index, scheduled)
        finally:
            slots.release()

    async def send(index: int, scheduled: float) -> None:
        nonlocal opened
        if True:
            connection = None
            while idle:
                candidate = idle.pop()
                if candidate.usable:
                    connection = candidate
                    break
            try:
                if connection is None:
                    _, connection = await loop.create_connection(_HttpConnection, host, port)
                    connection.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    opened += 1
                remaining = max(0.001, scheduled + timeout_s - time.perf_counter())
                status, payload = await asyncio.wait_for(connection.request(raws[index % len(raws)]), remaining)
            except TimeoutError:
                if connection is not None and connection.transport is not None:
                    connection.transport.close()
                latencies[index] = timeout_s  # censored at the timeout
                errors.append(f"no answer within {timeout_s:g}s of the scheduled send time")
                return
            except (OSError, ConnectionError) as exc:
                if connection is not None and connection.transport is not None:
                    connection.transport.close()
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            finished = time.perf_counter()
            idle.append(connection)
            if status >= 300:
                errors.append(f"HTTP {status}: {payload[:200].decode('utf-8', 'replace')}")
                return
            latencies[index] = finished - scheduled

    cpu0 = time.process_time()
    start = time.perf_counter() + 0.05
    tasks = []
    for index in range(total):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, time.perf_counter() - scheduled)
        tasks.append(asyncio.ensure_future(one(index, scheduled)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    for connection in idle:
        if connection.transport is not None:
            connection.transport.close()
    done = latencies[~np.isnan(latencies)] * 1000.0
    if done.size == 0:
        raise LoadGenError(f"no request succeeded at {rate:g} req/s; first errors: {errors[:3]}")
    p50, p90, p99 = np.percentile(done, [50, 90, 99])
    return OpenLoopResult(
        offered_rate=rate,
        duration_s=duration_s,
        sent=total,
        completed=total - len(errors),
        errors=len(errors),
        achieved_rate=(total - len(errors)) / wall,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        max_ms=float(done.max()),
        max_send_lag_ms=max_lag * 1000.0,
        connections_opened=opened,
        client_cpu_s=cpu,
        client_cpu_cores=cpu / wall,
        error_samples=errors[:3],
    )


def run_open_loop(
    url: str,
    bodies: Sequence[bytes],
    *,
    rate: float,
    duration_s: float,
    max_connections: int = 128,
    timeout_s: float = 2.0,
) -> OpenLoopResult:
    """Offer `rate` POSTs/s for `duration_s` (cycling through `bodies`); latency from schedule.

    A request not answered within `timeout_s` of its scheduled time counts as an error and enters
    the percentiles as `timeout_s` (a lower bound), so an overloaded server shows p99 >= timeout
    instead of a run that drags on for minutes."""
    if rate <= 0 or duration_s <= 0:
        raise LoadGenError(f"rate and duration must be > 0, got {rate} and {duration_s}")
    if not bodies:
        raise LoadGenError("no request bodies")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # plain asyncio is fine, only slower
        runner = asyncio.run
    # A full garbage collection of this (benchmark) process stalls the schedule for ~100 ms, which
    # the coordinated-omission correction would book as server latency: no collection while the
    # generator runs (it allocates little; the pause is the generator's, not the server's).
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return runner(_open_loop(url, list(bodies), rate, duration_s, max_connections, timeout_s))
    finally:
        gc.enable()
        gc.unfreeze()


def machine_load() -> dict[str, float]:
    one, five, _ = os.getloadavg()
    return {"cpus": _cpu_cores(), "load_average_1m": one, "load_average_5m": five}


def self_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
