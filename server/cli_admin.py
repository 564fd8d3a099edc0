"""`loraplex adapters|tenants|experiments|drift|audit ...`: an operator CLI over the admin API.

Talks to a running gateway (`--url`, env `LORAPLEX_ADMIN_URL`) with the admin key (`--admin-key`,
env `LORAPLEX_ADMIN_KEY`); prints the API's JSON; exits 1 with the error message on a 4xx/5xx.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from server.cli_merge import add_merge_command, run_merge

DEFAULT_URL = "http://127.0.0.1:8080"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LORAPLEX_ADMIN_URL", DEFAULT_URL))
    common.add_argument("--admin-key", default=os.environ.get("LORAPLEX_ADMIN_KEY"))

    ad = sub.add_parser("adapters", help="manage adapter versions (admin API)")
    a = ad.add_subparsers(dest="action", required=True)
    a.add_parser("list", parents=[common])
    p = a.add_parser("show", parents=[common], help="one adapter: versions and aliases")
    p.add_argument("name")
    p = a.add_parser("register", parents=[common], help="fetch, validate, smoke-test, register")
    p.add_argument("name")
    p.add_argument("source", help="absolute dir, file://, http(s):// archive or s3://...")
    p.add_argument("--base-digest")
    p.add_argument("--alias", help="point this alias at the new version once it is ready")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    p = a.add_parser("validate", parents=[common], help="run every check without registering")
    p.add_argument("source")
    p.add_argument("--base-digest")
    p = a.add_parser("promote", parents=[common], help="move an alias (default stable)")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", default="stable")
    p = a.add_parser("unalias", parents=[common], help="delete an alias")
    p.add_argument("name")
    p.add_argument("alias")
    for action in ("pin", "unpin", "retire", "delete", "revalidate"):
        p = a.add_parser(action, parents=[common])
        p.add_argument("name")
        p.add_argument("version", type=int)
    a.add_parser("residency", parents=[common], help="what is registered on the engine")
    add_merge_command(a, common)  # `adapters merge`: compose versions (server/cli_merge.py)

    te = sub.add_parser("tenants", help="manage tenants (admin API)")
    t = te.add_subparsers(dest="action", required=True)
    t.add_parser("list", parents=[common])
    for action in ("create", "update"):
        p = t.add_parser(action, parents=[common])
        p.add_argument("name")
        p.add_argument("--adapters", help="comma-separated adapter names (and/or the base model)")
        p.add_argument("--default")
        p.add_argument("--max-adapters", type=int)
        p.add_argument("--rpm", type=int, help="requests per minute")
        p.add_argument("--tpm", type=int, help="tokens per minute")
        p.add_argument("--max-concurrent", type=int, help="requests in flight at once")
        p.add_argument("--max-tokens", type=int, help="cap on a request's max_tokens")
        p.add_argument("--max-n", type=int, help="cap on a request's n")
        p.add_argument("--max-best-of", type=int, help="cap on a request's best_of")
    p = t.add_parser("rotate-key", parents=[common])
    p.add_argument("name")
    p.add_argument("--drop-previous", action="store_true", help="old key stops working now")
    p = t.add_parser("delete", parents=[common])
    p.add_argument("name")

    ex = sub.add_parser("experiments", help="A/B experiments (admin API)")
    e = ex.add_subparsers(dest="action", required=True)
    e.add_parser("list", parents=[common])
    p = e.add_parser("create", parents=[common], help="start one from a JSON/YAML definition")
    p.add_argument("file", help="definition file (docs/experiments.md), '-' for stdin")
    for action in ("show", "analysis", "pause", "resume", "abort", "delete"):
        p = e.add_parser(action, parents=[common])
        p.add_argument("name")
    p = e.add_parser("promote", parents=[common], help="end it with a winner")
    p.add_argument("name")
    p.add_argument("--variant")
    p = e.add_parser("weights", parents=[common], help="set candidate shares by hand")
    p.add_argument("name")
    p.add_argument("shares", nargs="+", metavar="VARIANT=SHARE")

    dr = sub.add_parser("drift", help="traffic drift per tenant (admin API)")
    d = dr.add_subparsers(dest="action", required=True)
    d.add_parser("show", parents=[common])
    p = d.add_parser("reference", parents=[common], help="reset or set a tenant's reference")
    p.add_argument("tenant")
    p.add_argument("--reset", action="store_true", help="collect a new first-N reference")

    au = sub.add_parser("audit", help="read the audit log (newest first)", parents=[common])
    au.add_argument("--limit", type=int, default=50)
    au.add_argument("--before", type=int)


def run(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    if not args.admin_key:
        print(
            "loraplex: an admin key is needed (--admin-key or LORAPLEX_ADMIN_KEY)", file=sys.stderr
        )
        return 2
    headers = {"Authorization": f"Bearer {args.admin_key}", "X-Loraplex-Actor": _who()}
    with httpx.Client(
        base_url=args.url, headers=headers, timeout=600, transport=transport
    ) as client:
        if args.command == "adapters" and args.action == "merge":
            return run_merge(args, client)
        method, path, body = _request(args)
        try:
            resp = client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            print(f"loraplex: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 1
    try:
        payload: Any = resp.json()
    except ValueError:
        payload = {"error": {"message": resp.text, "code": "not_json"}}
    if resp.is_error:
        err = payload.get("error", {}) if isinstance(payload, dict) else {}
        print(
            f"loraplex: {resp.status_code} {err.get('code')}: {err.get('message')}", file=sys.stderr
        )
        return 1
    print(json.dumps(payload, indent=2, sort_keys=True))
    return 0


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    if args.command == "audit":
        query = f"?limit={args.limit}" + (f"&before={args.before}" if args.before else "")
        return "GET", f"/admin/v1/audit{query}", None
    if args.command == "tenants":
        return _tenant_request(args)
    if args.command == "experiments":
        return _experiment_request(args)
    if args.command == "drift":
        if args.action == "show":
            return "GET", "/admin/v1/drift", None
        body = {"reset": True} if args.reset else {"from": "current"}
        return "POST", f"/admin/v1/drift/{args.tenant}/reference", body
    act = args.action
    base = "/admin/v1/adapters"
    if act == "list":
        return "GET", base, None
    if act == "residency":
        return "GET", "/admin/v1/residency", None
    if act == "show":
        return "GET", f"{base}/{args.name}", None
    if act == "register":
        meta = dict(_kv(m) for m in args.meta)
        body = {"name": args.name, "source": args.source, "metadata": meta}
        if args.base_digest:
            body["base_digest"] = args.base_digest
        if args.alias:
            body["alias"] = args.alias
        return "POST", base, body
    if act == "validate":
        body = {"source": args.source}
        if args.base_digest:
            body["base_digest"] = args.base_digest
        return "POST", f"{base}/validate", body
    if act == "promote":
        return "PUT", f"{base}/{args.name}/aliases/{args.alias}", {"version": args.version}
    if act == "unalias":
        return "DELETE", f"{base}/{args.name}/aliases/{args.alias}", None
    version = f"{base}/{args.name}/versions/{args.version}"
    return {
        "pin": ("POST", f"{version}/pin", None),
        "unpin": ("DELETE", f"{version}/pin", None),
        "retire": ("POST", f"{version}/retire", None),
        "revalidate": ("POST", f"{version}/validate", None),
        "delete": ("DELETE", version, None),
    }[act]


def _tenant_request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    base = "/admin/v1/tenants"
    if args.action == "list":
        return "GET", base, None
    if args.action == "delete":
        return "DELETE", f"{base}/{args.name}", None
    if args.action == "rotate-key":
        return "POST", f"{base}/{args.name}/rotate-key", {"keep_previous": not args.drop_previous}
    body: dict[str, Any] = {}
    if args.adapters is not None:
        body["adapters"] = [a.strip() for a in args.adapters.split(",") if a.strip()]
    if args.default is not None:
        body["default"] = args.default
    quotas = {
        "max_adapters": args.max_adapters,
        "requests_per_minute": args.rpm,
        "tokens_per_minute": args.tpm,
        "max_concurrent": args.max_concurrent,
        "max_tokens": args.max_tokens,
        "max_n": args.max_n,
        "max_best_of": args.max_best_of,
    }
    if any(v is not None for v in quotas.values()):
        # The API replaces the whole quota set: the flags given are the tenant's quotas.
        body["quotas"] = {k: v for k, v in quotas.items() if v is not None}
    if args.action == "create":
        return "POST", base, {"name": args.name, **body}
    return "PATCH", f"{base}/{args.name}", body


def _experiment_request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    base = "/admin/v1/experiments"
    act = args.action
    if act == "list":
        return "GET", base, None
    if act == "create":
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        body = yaml.safe_load(text)
        if not isinstance(body, dict):
            raise SystemExit("loraplex: the definition must be a JSON/YAML object")
        return "POST", base, body
    path = f"{base}/{args.name}"
    if act in ("show", "analysis"):
        return "GET", path if act == "show" else f"{path}/analysis", None
    if act == "delete":
        return "DELETE", path, None
    if act == "promote":
        return "POST", f"{path}/promote", {"variant": args.variant}
    if act == "weights":
        shares = {}
        for item in args.shares:
            name, value = _kv(item, "VARIANT=SHARE")
            try:
                shares[name] = float(value)
            except ValueError:
                raise SystemExit(f"loraplex: {item!r}: the share must be a number") from None
        return "POST", f"{path}/weights", {"weights": shares}
    return "POST", f"{path}/{act}", {}


def _kv(text: str, shape: str = "KEY=VALUE") -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"loraplex: expected {shape}, got {text!r}")
    return key, value


def _who() -> str:
    try:
        return getpass.getuser()[:64]
    except (KeyError, OSError):
        return "cli"
