"""What the fault tests share: a fake engine process they can kill and restart, a gateway
process in front of it, and a client that classifies every outcome.

Every request a test sends carries a unique OpenAI `user` field, which the gateway forwards
and the fake engine writes to its journal (loadtest/bench/fake_upstream.py), so a test can
match each client outcome with what the engine saw: nothing lost (every answer was generated
once), nothing duplicated (no request generated twice; a retry only follows an attempt the
engine refused or never got), and every client got a full answer or a clean error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson

from loadtest.bench.procs import (
    BENCH_KEY,
    PY,
    fake_adapter_dir,
    free_port,
    gateway_cmd,
    gateway_config,
    wait_ready,
)
from tests.promtext import metric

ADMIN_KEY = "sk-faults-admin"
ADAPTER = "support"
MESSAGES = [{"role": "user", "content": "hi"}]


class Engine:
    """The fake upstream as a real process on a fixed port: kill -9 it, start it again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.journal = workdir / "engine-journal.jsonl"
        self.log = workdir / "engine.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        cmd = [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--journal", str(self.journal)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_ready(f"{self.url}/health", 30, self.proc)
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL, like an OOM kill: no clean shutdown, connections reset by the kernel."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def faults(self, **spec: Any) -> None:
        httpx.post(f"{self.url}/faults", json=spec, timeout=10).raise_for_status()

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = httpx.get(f"{self.url}/stats", timeout=10).json()
        return out

    def models(self) -> set[str]:
        data = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]
        return {str(m["id"]) for m in data}

    def entries(self) -> list[dict[str, Any]]:
        """The journal: one dict per request event (id, event, t: wall-clock time)."""
        if not self.journal.exists():
            return []
        return [orjson.loads(line) for line in self.journal.read_bytes().splitlines()]

    def events(self) -> dict[str, list[str]]:
        """Journal events per request id (requests without a `user` are the gateway's own)."""
        out: dict[str, list[str]] = {}
        for entry in self.entries():
            if entry["id"] is not None:
                out.setdefault(entry["id"], []).append(entry["event"])
        return out

    def durations(self, ids: list[str]) -> dict[str, float]:
        """Seconds from each request's first `received` to its last event (its engine side)."""
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for entry in self.entries():
            rid = entry["id"]
            if rid in ids:
                first.setdefault(rid, entry["t"])
                last[rid] = entry["t"]
        return {rid: last[rid] - first[rid] for rid in first}

    def wait_events(
        self, ids: list[str], done: Any, timeout_s: float = 5.0
    ) -> dict[str, list[str]]:
        """Poll the journal until `done(events_of_id)` holds for every id in `ids`."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self.events()
            if all(done(seen.get(i, [])) for i in ids):
                return seen
            if time.monotonic() > deadline:
                bad = {i: seen.get(i) for i in ids if not done(seen.get(i, []))}
                raise AssertionError(f"engine journal not as expected: {bad}")
            time.sleep(0.02)


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    client: httpx.Client
    admin: httpx.Client

    @property
    def pid(self) -> int:
        return self.proc.pid

    def runtime(self) -> dict[str, Any]:
        resp = self.admin.get("/admin/v1/runtime")
        resp.raise_for_status()
        out: dict[str, Any] = resp.json()
        return out

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def in_flight(self) -> int:
        slots = self.admin.get("/admin/v1/residency").json()["slots"]
        return sum(int(s["in_flight"]) for s in slots)

    def metric(self, name: str, **labels: str) -> float:
        return metric(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)

    def requests_total(self) -> float:
        return self.metric("loraplex_requests_total")

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Seconds until /readyz says ready (engine up, adapters registered)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"gateway not ready after {timeout_s} s")

    def settle(
        self, baseline: dict[str, Any], timeout_s: float = 5.0, fds: bool = False
    ) -> dict[str, Any]:
        """Wait until tasks, engine connections in use, leases (and with `fds`, open file
        descriptors: only when the clients' own connections to the gateway are closed too)
        are back to `baseline` (a leak keeps them up); returns the last reading."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = self.runtime()
            fine = (
                now["tasks"] <= baseline["tasks"]
                and (not fds or now["open_fds"] <= baseline["open_fds"])
                and now["engine_connections"]["in_use"] == 0
                and now["leases_in_flight"] == 0
            )
            if fine or time.monotonic() > deadline:
                return now
            time.sleep(0.05)


@contextlib.contextmanager
def gateway(
    workdir: Path, engine_url: str, env: dict[str, str] | None = None, ready: bool = True
) -> Iterator[Gateway]:
    """A gateway process (one tenant entitled to `support` + base) in front of `engine_url`."""
    source = fake_adapter_dir(workdir / "src", ADAPTER)
    args, base_env = gateway_config(workdir / "gw", {ADAPTER: source})
    for key in ("LORAPLEX_ROUTER__ROUTES_FILE", "LORAPLEX_ROUTER__CLASSIFIER"):
        base_env.pop(key)  # no model="auto" here: a faster start
    base_env |= {
        "LORAPLEX_ENGINE__URL": engine_url,
        "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
        "LORAPLEX_LOG_LEVEL": "warning",
        "LORAPLEX_ENGINE__HEALTH_INTERVAL_S": "0.5",
        "LORAPLEX_REGISTRY__POLL_INTERVAL_S": "0.5",
        **(env or {}),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "gateway.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            gateway_cmd(port, args),
            env={**os.environ, **base_env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = httpx.Client(
        base_url=url,
        headers={"Authorization": f"Bearer {BENCH_KEY}"},
        timeout=30,
        limits=httpx.Limits(max_connections=64),
    )
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    gw = Gateway(url, proc, log, client, admin)
    try:
        wait_ready(f"{url}/healthz", 60, proc)
        if ready:
            gw.wait_ready(60)
        yield gw
    finally:
        client.close()
        admin.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- client outcomes ---------------------------------------------------------------------------

Kind = Literal["answer", "error", "left", "broken"]


@dataclass
class Outcome:
    """What one client saw. `answer`: a full answer; `error`: a clean error (OpenAI error
    shape; a stream: an SSE error event then [DONE], nothing after); `left`: the client hung
    up on purpose; `broken`: anything else (a test failure)."""

    rid: str
    kind: Kind
    status: int
    code: str | None = None
    events: int = 0
    seconds: float = 0.0
    ended: float = 0.0  # time.monotonic() when the client was done
    retry_after: str | None = None
    detail: str = ""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def body(rid: str, model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "stream": stream, "user": rid}


def is_error_shape(obj: Any) -> bool:
    err = obj.get("error") if isinstance(obj, dict) else None
    return (
        isinstance(err, dict)
        and isinstance(err.get("message"), str)
        and isinstance(err.get("type"), str)
        and isinstance(err.get("code"), str)
        and "param" in err
    )


def call(
    client: httpx.Client,
    rid: str,
    model: str = ADAPTER,
    stream: bool = True,
    leave_after: int | None = None,
) -> Outcome:
    """Send one chat completion; `leave_after` hangs up after that many stream events."""
    t0 = time.monotonic()
    try:
        with client.stream("POST", "/v1/chat/completions", json=body(rid, model, stream)) as r:
            out = _read(r, rid, stream, leave_after)
    except httpx.HTTPError as exc:
        out = Outcome(rid, "broken", 0, detail=f"transport: {exc!r}")
    out.ended = time.monotonic()
    out.seconds = out.ended - t0
    return out


def _read(r: httpx.Response, rid: str, stream: bool, leave_after: int | None) -> Outcome:
    retry_after = r.headers.get("retry-after")
    if r.status_code != 200:
        raw = r.read()
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Outcome(rid, "broken", r.status_code, detail=f"not JSON: {raw[:200]!r}")
        if not is_error_shape(parsed):
            return Outcome(rid, "broken", r.status_code, detail=f"error shape: {parsed}")
        code = parsed["error"]["code"]
        return Outcome(rid, "error", r.status_code, code, retry_after=retry_after)
    if not stream:
        parsed = orjson.loads(r.read())
        if parsed.get("choices"):
            return Outcome(rid, "answer", 200)
        return Outcome(rid, "broken", 200, detail=f"no choices: {parsed}")
    return _read_sse(r, rid, leave_after)


def _read_sse(r: httpx.Response, rid: str, leave_after: int | None) -> Outcome:
    events = 0
    error: dict[str, Any] | None = None
    done = False
    for line in r.iter_lines():
        if not line:
            continue
        if done:
            return Outcome(rid, "broken", 200, events=events, detail=f"after [DONE]: {line!r}")
        if not line.startswith("data: "):
            return Outcome(rid, "broken", 200, events=events, detail=f"line {line!r}")
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        if error is not None:
            return Outcome(rid, "broken", 200, events=events, detail="event after the error")
        chunk = orjson.loads(data)
        if "error" in chunk:
            if not is_error_shape(chunk):
                return Outcome(rid, "broken", 200, events=events, detail=f"error event {chunk}")
            error = chunk
            continue
        events += 1
        if leave_after is not None and events >= leave_after:
            return Outcome(rid, "left", 200, events=events)
    if not done:
        return Outcome(rid, "broken", 200, events=events, detail="ended without [DONE]")
    if error is not None:
        return Outcome(rid, "error", 200, error["error"]["code"], events=events)
    return Outcome(rid, "answer", 200, events=events)


def run_all(client: httpx.Client, calls: list[dict[str, Any]], workers: int = 16) -> list[Outcome]:
    """Send `calls` (keyword arguments of `call`) concurrently."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda kw: call(client, **kw), calls))


# -- accounting --------------------------------------------------------------------------------

REFUSED_BY_ENGINE = {"error", "dropped"}  # attempts that may be followed by a retry


@dataclass
class Ledger:
    """Client outcomes of one scenario (ids starting with `prefix`) against the engine
    journal (module docstring)."""

    prefix: str
    outcomes: list[Outcome]
    journal: dict[str, list[str]]
    summary: Counter[str] = field(default_factory=Counter)

    def check(self, max_attempts: int = 2) -> Counter[str]:
        ids = {o.rid for o in self.outcomes}
        assert len(ids) == len(self.outcomes), "request ids must be unique"
        assert all(i.startswith(self.prefix) for i in ids)
        unknown = {i for i in self.journal if i.startswith(self.prefix)} - ids
        assert not unknown, f"the engine saw requests no client sent: {unknown}"
        for o in self.outcomes:
            assert o.kind != "broken", f"{o.rid}: {o.detail} (status {o.status})"
            seen = self.journal.get(o.rid, [])
            received = seen.count("received")
            completed = seen.count("completed")
            self.summary[o.kind] += 1
            self.summary["engine_received"] += received
            self.summary["retried"] += max(received - 1, 0)
            assert received <= max_attempts, f"{o.rid}: {received} attempts > {max_attempts}"
            # Every attempt but the last was refused by the engine or never reached it.
            outcomes = [e for e in seen if e != "received"]
            assert all(e in REFUSED_BY_ENGINE for e in outcomes[:-1]), f"{o.rid}: {seen}"
            assert completed <= 1, f"{o.rid} generated {completed} times (duplicated)"
            if o.kind == "answer":
                assert completed == 1, f"{o.rid}: a client answer the engine never generated"
            elif o.kind == "error":
                assert completed == 0, f"{o.rid}: generated, but the client got {o.code}"
            elif o.kind == "left":
                assert completed == 0, f"{o.rid}: the engine finished an abandoned stream"
        return self.summary


def check(
    engine: Engine,
    prefix: str,
    outcomes: list[Outcome],
    max_attempts: int = 2,
    wait_ended: bool = True,
) -> Counter[str]:
    """`Ledger.check` against the journal, once the engine has ended every request it got
    (`wait_ended=False`: it was killed, some never end)."""
    journal = engine.events()
    if wait_ended:
        ended = {"completed", "error", "dropped", "aborted"}
        ids = [o.rid for o in outcomes if o.rid in journal]
        journal = engine.wait_events(ids, lambda ev: ev[-1] in ended)
    return Ledger(prefix, outcomes, journal).check(max_attempts)
