"""A PostgreSQL cluster that a test can stop and start again on the same port and data
directory (tests/pg.py's throwaway cluster, made restartable for the registry outage)."""

from __future__ import annotations

import os
import shutil
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
