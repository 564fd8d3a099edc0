"""kill -9 of a real gateway process while operators change the registry: tenant create,
update, key rotation and delete, alias moves, experiment create / weights / pause / resume /
abort / delete, from several clients at once. After each kill the registry must be consistent:

- the database is sound (SQLite `integrity_check` and `foreign_key_check`);
- every mutation a client saw acknowledged (2xx) has its audit row, every refused one (4xx)
  has none, and every audit row written for these clients belongs to a request one sent;
- the stored state is exactly what the audit log says happened last, both ways: the newest
  audit entry of each tenant, alias, experiment and version equals what is stored (a deleted
  thing's entry says deleted), and everything stored has such an entry;
- the registry opens, the snapshot loads, and a restarted gateway serves and accepts more
  mutations on the same database.

Runs several kills on one database, on SQLite (and PostgreSQL when its server binaries are
installed), over the fake upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.registry import Registry, Snapshot
from adapters.registry_types import AuditEntry
from loadtest.bench.procs import (
    BENCH_KEY,
    PY,
    fake_adapter_dir,
    fleet,
    free_port,
    gateway_cmd,
    gateway_config,
    wait_ready,
)
from tests.e2e.harness import report
from tests.pg import _bin, postgres_cluster

ADMIN_KEY = "sk-system-durability-admin"
WORKERS = 3
pytestmark = pytest.mark.system


@dataclass
class Sent:
    rid: str
    method: str
    path: str
    status: int | None = None  # None: no answer (in flight when the gateway died)
    body: Any = None


@dataclass
class Log:
    sent: list[Sent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: list[str] = field(default_factory=list)  # every API key handed out

    def add(self, s: Sent) -> None:
        with self.lock:
            self.sent.append(s)


class Operator(threading.Thread):
    """One admin client changing its own tenants, its own experiment (target support@w<N>)
    and the shared `canary` alias, as fast as the gateway answers, until it dies."""

    def __init__(self, url: str, worker: int, run: int, log: Log, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.w, self.run_no, self.log = url, worker, run, log
        self.rng = random.Random(seed)  # noqa: S311 - test traffic
        self.seq = 0
        self.stop = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", "X-Loraplex-Actor": "durability"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as client:
            while not self.stop.is_set():
                method, path, body = self.next_mutation(client)
                self.seq += 1
                sent = Sent(f"dur-{self.run_no}-{self.w}-{self.seq}", method, path)
                self.log.add(sent)
                try:
                    resp = client.request(
                        method, path, json=body, headers={"X-Request-Id": sent.rid}
                    )
                except httpx.HTTPError:
                    return  # the gateway is gone
                sent.status = resp.status_code
                sent.body = resp.json() if resp.content else None
                if isinstance(sent.body, dict) and "api_key" in sent.body:
                    with self.log.lock:
                        self.log.keys.append(sent.body["api_key"])

    def next_mutation(self, client: httpx.Client) -> tuple[str, str, dict[str, Any] | None]:
        rng, w = self.rng, self.w
        tenant = f"w{w}-t{rng.randrange(4)}"
        experiment = f"w{w}-e{rng.randrange(2)}"
        kind = rng.choice(
            ["tenant"] * 4 + ["rotate", "delete_tenant", "alias", "alias"] + ["experiment"] * 4
        )
        if kind == "tenant":
            quotas = {"max_concurrent": rng.randint(1, 9), "max_tokens": rng.randint(1, 999)}
            body = {"adapters": rng.sample(["support", "base", "other"], 2), "quotas": quotas}
            if rng.random() < 0.5:
                return "POST", "/admin/v1/tenants", {"name": tenant, **body}
            return "PATCH", f"/admin/v1/tenants/{tenant}", body
        if kind == "rotate":
            keep = {"keep_previous": rng.random() < 0.5}
            return "POST", f"/admin/v1/tenants/{tenant}/rotate-key", keep
        if kind == "delete_tenant":
            return "DELETE", f"/admin/v1/tenants/{tenant}", None
        if kind == "alias":
            return (
                "PUT",
                "/admin/v1/adapters/support/aliases/canary",
                {"version": rng.choice([1, 2])},
            )
        action = rng.choice(["create", "create", "weights", "pause", "resume", "abort", "delete"])
        if action == "create":
            return (
                "POST",
                "/admin/v1/experiments",
                {
                    "name": experiment,
                    "target": f"support@w{w}",
                    "variants": [
                        {"name": "control", "model": "support@1"},
                        {"name": "candidate", "model": "support@2"},
                    ],
                    "weights": {"candidate": 0.1},
                },
            )
        if action == "weights":
            share = {"candidate": round(rng.random(), 3)}
            return "POST", f"/admin/v1/experiments/{experiment}/weights", {"weights": share}
        if action == "delete":
            return "DELETE", f"/admin/v1/experiments/{experiment}", None
        return "POST", f"/admin/v1/experiments/{experiment}/{action}", {}


@dataclass
class Stack:
    work: Path
    url: str
    db_url: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.work / "gateway.log").open("ab")
        self.proc = subprocess.Popen(
            gateway_cmd(int(self.url.rsplit(":", 1)[1]), self.args),
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_ready(f"{self.url}/readyz", 90, self.proc)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def databases() -> list[str]:
    try:
        _bin("initdb")
    except RuntimeError:
        return ["sqlite"]
    return ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("durability-upstream")
    port = free_port()
    with fleet(work) as procs:
        procs.start("upstream", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(port)])
        procs.ready("upstream", f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(params=databases())
def stack(request: pytest.FixtureRequest, upstream: str, tmp_path: Path) -> Iterator[Stack]:
    v1 = fake_adapter_dir(tmp_path / "src1", "support", rank=8)
    v2 = fake_adapter_dir(tmp_path / "src2", "support", rank=4)
    args, env = gateway_config(tmp_path / "gw", {"support": v1})
    env |= {
        "LORAPLEX_ENGINE__URL": upstream,
        "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
        "LORAPLEX_LOG_LEVEL": "info",
        "LORAPLEX_REGISTRY__INTERRUPTED_AFTER_S": "0",
    }
    with contextlib.ExitStack() as resources:
        if request.param == "postgresql":
            env["LORAPLEX_REGISTRY__URL"] = resources.enter_context(postgres_cluster())
        s = Stack(
            tmp_path, f"http://127.0.0.1:{free_port()}", env["LORAPLEX_REGISTRY__URL"], args, env
        )
        s.start()
        try:
            with admin_client(s.url) as admin:
                made = admin.post("/admin/v1/adapters", json={"name": "support", "source": v2})
                assert made.status_code == 201, made.text
                for alias in ["canary", *(f"w{w}" for w in range(WORKERS))]:
                    assert admin.put(
                        f"/admin/v1/adapters/support/aliases/{alias}", json={"version": 1}
                    ).is_success
            yield s
        finally:
            s.stop()


def admin_client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


KILLS = 4


def test_kill_9_during_admin_and_experiment_mutations_leaves_the_registry_consistent(
    stack: Stack,
) -> None:
    log = Log()
    rng = random.Random(8)  # noqa: S311 - kill times
    figures = []
    for run in range(KILLS):
        operators = [Operator(stack.url, w, run, log, seed=run * 10 + w) for w in range(WORKERS)]
        for op in operators:
            op.start()
        time.sleep(rng.uniform(0.5, 2.0))  # mutations running on every worker
        stack.kill9()
        for op in operators:
            op.stop.set()
            op.join(15)
            assert not op.is_alive()
        mine = [s for s in log.sent if s.rid.startswith(f"dur-{run}-")]
        figures.append(
            {
                "run": run,
                "sent": len(mine),
                "acked": sum(1 for s in mine if s.status is not None and s.status < 300),
                "refused": sum(1 for s in mine if s.status is not None and s.status >= 400),
                "unanswered": sum(1 for s in mine if s.status is None),
            }
        )
        assert figures[-1]["acked"] > 0
        check_database(stack)
        entries, snap = asyncio.run(read_registry(stack.db_url))
        audited = {e.request_id for e in entries}
        figures[-1]["unanswered_but_committed"] = sum(
            1 for s in mine if s.status is None and s.rid in audited
        )
        check_audit_matches_requests(entries, log)
        check_state_matches_audit(entries, snap)
        stack.start()  # same database: the gateway comes back and serves
        check_serving(stack)
    report("durability kill -9", database=stack.db_url.split("+")[0], runs=figures)
    logged = (stack.work / "gateway.log").read_text(errors="replace")
    for key in [ADMIN_KEY, BENCH_KEY, *log.keys]:
        assert key not in logged


def check_database(stack: Stack) -> None:
    if not stack.db_url.startswith("sqlite"):
        return
    path = stack.db_url.split("///", 1)[1]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()


async def read_registry(url: str) -> tuple[list[AuditEntry], Snapshot]:
    reg = await Registry.open(url)
    try:
        entries = await reg.audit_entries(limit=1_000_000)
        return list(reversed(entries)), reg.snapshot
    finally:
        await reg.close()


def check_audit_matches_requests(entries: list[AuditEntry], log: Log) -> None:
    rows: dict[str, list[AuditEntry]] = {}
    for e in entries:
        if e.request_id and e.request_id.startswith("dur-"):
            rows.setdefault(e.request_id, []).append(e)
    sent = {s.rid: s for s in log.sent}
    assert set(rows) <= set(sent), "audit rows for requests nobody sent"
    for rid, s in sent.items():
        if s.status is None:
            continue  # died with the gateway: committed whole or not at all (checked below)
        if s.status >= 400:
            assert rid not in rows, (s, rows.get(rid))
        elif not _no_op_alias_move(s):
            assert rid in rows, f"acknowledged {s.method} {s.path} ({rid}) has no audit row"


def _no_op_alias_move(s: Sent) -> bool:
    body = s.body if isinstance(s.body, dict) else {}
    return s.method == "PUT" and "/aliases/" in s.path and body.get("before") == body.get("version")


def check_state_matches_audit(entries: list[AuditEntry], snap: Snapshot) -> None:
    last: dict[str, AuditEntry] = {}
    for e in entries:
        last[e.target] = e  # oldest first: the newest entry per target wins
    for name, tenant in snap.tenants.items():
        assert last[f"tenant:{name}"].after == tenant.as_audit(), name
    for name, exp in snap.experiments.items():
        after = last[f"experiment:{name}"].after
        assert after is not None, name
        assert {k: after[k] for k in exp.as_audit()} == exp.as_audit(), name
    for (name, alias), number in snap.aliases.items():
        assert last[f"{name}@{alias}"].after == {"version": number}, (name, alias)
    for (name, number), version in snap.versions.items():
        states = [
            e for e in entries if e.target == f"{name}@{number}" and "state" in (e.after or {})
        ]
        assert states[-1].after["state"] == version.state.value, (name, number)
    for target, entry in last.items():  # and the other way round: deletions stuck
        kind, _, name = target.partition(":")
        if kind == "tenant" and entry.action.startswith("tenant."):
            assert (name in snap.tenants) == (entry.after is not None), target
        if kind == "experiment":
            assert (name in snap.experiments) == (entry.after is not None), target
        if entry.action in ("alias.set", "alias.delete"):
            adapter, _, alias = target.partition("@")
            assert snap.aliases.get((adapter, alias)) == (entry.after or {}).get("version")


def check_serving(stack: Stack) -> None:
    with admin_client(stack.url) as admin:
        tenants = admin.get("/admin/v1/tenants")
        assert tenants.status_code == 200
        again = admin.put("/admin/v1/adapters/support/aliases/canary", json={"version": 2})
        assert again.status_code == 200, again.text
    resp = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "support", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {BENCH_KEY}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
