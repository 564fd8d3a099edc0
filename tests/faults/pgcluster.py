"""A PostgreSQL cluster that a test can stop and start again on the same port and data
directory (tests/pg.py's throwaway cluster, made restartable for the registry outage), or
freeze: every server process stopped with SIGSTOP, so connections are accepted by the kernel
and statements are sent, but nothing is ever answered (a hung database host)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.pg import _as_postgres, _bin, _free_port


class PgCluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="loraplex-pg-faults-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.url = f"postgresql+asyncpg://loraplex@127.0.0.1:{self.port}/postgres"

    def __enter__(self) -> PgCluster:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        cmd = [_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "loraplex"]
        subprocess.run(_as_postgres(cmd), check=True, capture_output=True)
        self.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "log")
        cmd = [_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", log, "-w", "start"]
        subprocess.run(_as_postgres(cmd), check=True, capture_output=True)

    def stop(self) -> None:
        """Immediate shutdown: connections are cut, as when the database host goes away."""
        cmd = [_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]
        subprocess.run(_as_postgres(cmd), check=False, capture_output=True)

    def processes(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, ...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process has gone
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        for pid in self.processes():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.processes():
            os.kill(pid, signal.SIGCONT)
