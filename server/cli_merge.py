"""`loraplex adapters merge NAME --from a@1:0.5 --from b@stable:0.5`: compose registered versions.

The gateway never imports torch, so the CLI only orchestrates: it resolves each `--from` through
the admin API (`GET /admin/v1/adapters/{name}`), checks that the version's files on disk still
have the registered digest, runs `python -m adapters.tools.merge` in the tools venv into a
directory named after the recipe (inputs' digests, weights, combination), and registers that
directory with `POST /admin/v1/adapters` like any other local source, so the result goes through
the same validation and smoke generation as every version. The CLI must therefore run where the
gateway can read the merged directory (same host or a shared volume; default
`<registry cache_dir>/../merged/`, see docs/adapters.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from adapters.types import DEFAULT_ALIAS

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_REFUSED = 2  # also what the merge tool exits with when it refuses
Runner = Callable[[Sequence[str], dict[str, str]], "subprocess.CompletedProcess[str]"]


class MergeCliError(Exception):
    """Printed as `loraplex: <message>`; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Ingredient:
    label: str  # name@version, resolved (an alias is looked up once, here)
    weight: float
    digest: str
    path: Path


def add_merge_command(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = actions.add_parser(
        "merge",
        parents=[common],
        help="combine versions (peft weighted combination) into a new registered version",
    )
    p.add_argument("name", help="adapter name the result is registered under")
    p.add_argument(
        "--from",
        dest="sources",
        action="append",
        required=True,
        metavar="NAME[@VERSION|@ALIAS]:WEIGHT",
        help="an input version and its weight; give two or more",
    )
    p.add_argument("--combination", choices=("cat", "linear", "svd"), default="cat")
    p.add_argument("--alias", help="point this alias at the result once it is ready")
    p.add_argument("--max-rank", type=int, default=16, help="the engine's --max-lora-rank")
    p.add_argument("--svd-rank", type=int)
    p.add_argument("--base-config", type=Path, help="served base's config.json (or its dir)")
    p.add_argument("--merged-dir", type=Path, help="where results are written (gateway-readable)")
    p.add_argument("--tools-python", help="python of the tools venv (torch + peft)")


def run_merge(args: argparse.Namespace, client: httpx.Client, runner: Runner | None = None) -> int:
    """Resolve, merge, register; prints the registered version's JSON. Returns the exit code."""
    try:
        ingredients = [_resolve(client, text) for text in args.sources]
        if len(ingredients) < 2:
            raise MergeCliError("merge needs at least two --from inputs", EXIT_REFUSED)
        out = _merged_dir(args) / _recipe(ingredients, args.combination, args.svd_rank)
        if not (out / "adapter_config.json").is_file():  # the same recipe was merged before
            _merge(args, ingredients, out, runner or _run)
        body = {
            "name": args.name,
            "source": str(out),
            "metadata": {
                "merged_from": [i.label for i in ingredients],
                "merged_from_digests": [i.digest for i in ingredients],
                "weights": [i.weight for i in ingredients],
                "combination": args.combination,
            },
        }
        if args.alias:
            body["alias"] = args.alias
        resp = client.post("/admin/v1/adapters", json=body)
        payload = _payload(resp, "register")
    except MergeCliError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return exc.code
    except httpx.HTTPError as exc:
        print(f"loraplex: cannot reach {client.base_url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(payload, indent=2, sort_keys=True))
    return 0


def parse_from(text: str) -> tuple[str, str, float]:
    """`name@sel:weight` → (name, version number or alias, weight); no `@` means `@stable`."""
    ref, sep, weight = text.rpartition(":")
    name, _, selector = ref.partition("@")
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if not sep or not name or value != value or value in (float("inf"), float("-inf")):
        raise MergeCliError(f"--from wants NAME[@VERSION|@ALIAS]:WEIGHT, got {text!r}", 2)
    return name, selector or DEFAULT_ALIAS, value


def _resolve(client: httpx.Client, text: str) -> Ingredient:
    name, selector, weight = parse_from(text)
    adapter = _payload(client.get(f"/admin/v1/adapters/{quote(name, safe='')}"), "look up")
    number = int(selector) if selector.isdigit() else adapter.get("aliases", {}).get(selector)
    if number is None:
        raise MergeCliError(f"{name} has no alias {selector!r}")
    version = next((v for v in adapter.get("versions", []) if v["version"] == number), None)
    if version is None:
        raise MergeCliError(f"{name} has no version {number}")
    label = f"{name}@{number}"
    if version["state"] not in ("ready", "retired"):
        raise MergeCliError(f"{label} is {version['state']}; only validated versions are merged")
    path = _local_path(version)
    if path is None:
        raise MergeCliError(
            f"{label} came from {version.get('source')!r}, not a local directory, and the admin "
            "API does not say where its files are; merge from a local copy registered by path"
        )
    if _digest(path) != version["digest"]:
        raise MergeCliError(f"{label}: the files at {path} no longer match its registered digest")
    return Ingredient(label, weight, version["digest"], path)


def _local_path(version: dict[str, Any]) -> Path | None:
    """The version's files: `path` when the API gives it, else a local directory source."""
    if isinstance(version.get("path"), str):
        return Path(version["path"])
    source = str(version.get("source", ""))
    if source.startswith("file://"):
        source = unquote(urlsplit(source).path)
    path = Path(source)
    return path if path.is_absolute() and path.is_dir() else None


def _digest(path: Path) -> str | None:
    from adapters.errors import AdapterRejected
    from adapters.validate import digest_adapter

    try:
        return digest_adapter(path)
    except (AdapterRejected, OSError):
        return None


def _recipe(ingredients: list[Ingredient], combination: str, svd_rank: int | None) -> str:
    """Content address of a merge: same inputs, weights and method → same directory."""
    spec = [[i.digest, i.weight] for i in ingredients]
    text = json.dumps({"inputs": spec, "combination": combination, "svd_rank": svd_rank})
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _merged_dir(args: argparse.Namespace) -> Path:
    if args.merged_dir is not None:
        return Path(args.merged_dir).resolve()
    cache = os.environ.get("LORAPLEX_REGISTRY__CACHE_DIR", ".cache/adapter-cache")
    return Path(cache).resolve().parent / "merged"


def _base_config(args: argparse.Namespace) -> Path:
    if args.base_config is not None:
        return Path(args.base_config)
    for var in ("LORAPLEX_REGISTRY__BASE_MODEL_DIR", "LORAPLEX_ENGINE__MODEL"):
        if os.environ.get(var):
            return Path(os.environ[var]) / "config.json"
    raise MergeCliError(
        "the served base model's config is needed: --base-config PATH/config.json "
        "(or LORAPLEX_REGISTRY__BASE_MODEL_DIR)",
        EXIT_REFUSED,
    )


def _merge(args: argparse.Namespace, items: list[Ingredient], out: Path, runner: Runner) -> None:
    python = args.tools_python or str(REPO_ROOT / ".cache" / "venv-tools" / "bin" / "python")
    cmd = [python, "-m", "adapters.tools.merge", "--out", str(out)]
    cmd += ["--combination", args.combination, "--base-config", str(_base_config(args))]
    cmd += ["--max-rank", str(args.max_rank)]
    if args.svd_rank is not None:
        cmd += ["--svd-rank", str(args.svd_rank)]
    cmd += [f"{i.path}:{i.weight!r}" for i in items]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    print(f"loraplex: merging {', '.join(i.label for i in items)} into {out}", file=sys.stderr)
    done = runner(cmd, env)
    if done.returncode != 0:
        why = (done.stderr or "").strip().splitlines()[-1:] or ["(no message)"]
        raise MergeCliError(why[0], EXIT_REFUSED if done.returncode == EXIT_REFUSED else 1)


def _run(cmd: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=False)


def _payload(resp: httpx.Response, what: str) -> dict[str, Any]:
    try:
        payload = resp.json()
    except ValueError:
        payload = {}
    if resp.is_error or not isinstance(payload, dict):
        err = payload.get("error", {}) if isinstance(payload, dict) else {}
        msg = err.get("message") or resp.text[:200]
        raise MergeCliError(f"{what}: {resp.status_code} {err.get('code')}: {msg}")
    return payload
