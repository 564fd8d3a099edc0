"""Profile the gateway's request path with py-spy under fake-upstream load.

Starts the fake upstream and a loraplex gateway (same set-up as the overhead benchmark), drives
a closed loop at `--concurrency` for `--seconds`, and samples the gateway with `py-spy record`
meanwhile. Writes the collapsed stacks (`profile.txt`, input for flame graph tools) and prints
the functions with the most samples, inclusive and self. py-spy is a dev tool:
`.venv/bin/pip install py-spy`.

    python -m loadtest.bench.profile_gateway [--seconds 15] [--concurrency 8] [--stream]
        [--model auto] [--out .cache/profile]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from loadtest.bench.overhead import MODEL, spec
from loadtest.bench.procs import (
    PY,
    fake_adapter_dir,
    fleet,
    free_port,
    gateway_cmd,
    gateway_config,
)
from loadtest.driver import run_closed


def top_frames(collapsed: Path, n: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(inclusive, self) sample counts per frame from py-spy's collapsed ("raw") output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        for f in set(frames):
            inclusive[f] += int(count)
        own[frames[-1]] += int(count)
    return inclusive.most_common(n), own.most_common(n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--model", default=MODEL, help='"auto": through domain routing')
    ap.add_argument("--out", type=Path, default=Path(".cache/profile"))
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    collapsed = args.out / "profile.txt"
    with tempfile.TemporaryDirectory() as tmp, fleet(Path(tmp)) as f:
        up, gw = free_port(), free_port()
        upstream = f"http://127.0.0.1:{up}"
        f.start("upstream", [PY, "-m", "loadtest.bench.fake_upstream", "--port", str(up)])
        f.ready("upstream", upstream + "/health")
        cfg, env = gateway_config(Path(tmp) / "gw", {MODEL: fake_adapter_dir(Path(tmp))})
        env |= {"LORAPLEX_ENGINE__URL": upstream, "LORAPLEX_LOG_LEVEL": "info"}
        f.start("loraplex", gateway_cmd(gw, cfg), env)
        url = f"http://127.0.0.1:{gw}"
        f.ready("loraplex", url + "/readyz")
        one = spec(args.stream, args.model)
        asyncio.run(run_closed(url, itertools.repeat(one), args.concurrency, 10**9, 1.0))
        record = [pyspy, "record", "--format", "raw", "--rate", "250", "--nonblocking"]
        record += ["--duration", str(max(1, int(args.seconds)))]
        record += ["-o", str(collapsed), "--pid", str(f.procs["loraplex"].pid)]
        spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = asyncio.run(
            run_closed(url, itertools.repeat(one), args.concurrency, 10**9, args.seconds + 1)
        )
        spy.wait(60)
    ok = sum(r.ok for r in run.results)
    print(f"{ok} requests ok in {run.elapsed_s:.1f} s ({ok / run.elapsed_s:.0f} RPS); {collapsed}")
    inclusive, own = top_frames(collapsed, args.top)
    total = max((c for _, c in inclusive), default=1)
    for title, rows in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title} samples (% of the busiest frame)")
        for frame, count in rows:
            print(f"{100 * count / total:6.1f}%  {frame}")


if __name__ == "__main__":
    main()
