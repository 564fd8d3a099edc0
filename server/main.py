"""`loraplex` command line: serve the gateway, prepare the demo model, hash keys, load-test."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from server.auth import hash_key

REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (settings from LORAPLEX_* env vars)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--engine-url")
    serve.add_argument("--engine-mode", choices=["remote", "local"])
    serve.add_argument("--engine-model", help="model dir for --engine-mode local")
    serve.add_argument("--tenants-file", type=Path)
    serve.add_argument("--adapters-file", type=Path)

    demo = sub.add_parser("demo", help="demo model and configuration")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    prep = demo_sub.add_parser("prepare", help="build (or reuse) the quantized model + adapters")
    prep.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache")
    prep.add_argument("--tools-python", default=None, help="python of the tools venv")
    cfg = demo_sub.add_parser("config", help="write demo tenants/adapters files from a manifest")
    cfg.add_argument("--manifest", type=Path, required=True)
    cfg.add_argument("--out", type=Path, required=True)

    from server.cli_admin import add_commands as add_admin_commands

    add_admin_commands(sub)

    keys = sub.add_parser("hash-key", help="print the sha256 digest to store for an API key")
    keys.add_argument("key")

    sub.add_parser("loadtest", help="run a load-test scenario (`loraplex loadtest --help`)")
    sub.add_parser("route", help="domain router: eval | train (`loraplex route --help`)")

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:  # its own parser; numpy/matplotlib imported only here
        from loadtest.cli import main as loadtest_main

        return loadtest_main(argv[1:])
    if argv[:1] == ["route"]:  # its own parser; scikit-learn/matplotlib imported only here
        from router.cli import main as route_main

        return route_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command in ("adapters", "tenants", "experiments", "drift", "audit"):
        from server.cli_admin import run as run_admin

        return run_admin(args)
    if args.command == "hash-key":
        print(hash_key(args.key))
        return 0
    if args.demo_command == "prepare":
        return _prepare(args.cache_dir, args.tools_python)
    from server.demo_config import write_demo_config, write_demo_routes

    for path in [*write_demo_config(args.manifest, args.out), write_demo_routes(args.out)]:
        print(path)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.logs import configure_logging
    from server.settings import Settings

    settings = Settings()
    overrides: dict[str, object] = {}
    for field in ("host", "port", "tenants_file", "adapters_file"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    engine = settings.engine.model_dump()
    for arg, field in (("engine_url", "url"), ("engine_mode", "mode"), ("engine_model", "model")):
        if getattr(args, arg) is not None:
            engine[field] = getattr(args, arg)
    settings = Settings.model_validate({**settings.model_dump(), **overrides, "engine": engine})
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="server.gc_tuning:serving_event_loop",  # uvloop, GC tuned for serving
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    return 0


def _prepare(cache_dir: Path, tools_python: str | None) -> int:
    """Run the offline builder in the tools venv (torch lives there, never in the gateway)."""
    python = tools_python or str(cache_dir / "venv-tools" / "bin" / "python")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [python, "-m", "adapters.tools.prepare", "--cache-dir", str(cache_dir)]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
