"""`python -m adapters.tools.merge --out DIR --combination {cat,linear,svd} --base-config
PATH/config.json SRC_DIR:WEIGHT SRC_DIR:WEIGHT ...` (tools venv).

Writes a normal peft adapter directory (adapter_config.json + adapter_model.safetensors) plus the
`loraplex.json` sidecar carrying the inputs' common base digest and the merge's provenance, then
prints one JSON line describing it. The result is built in a private sibling directory and
renamed into place, so `--out` either does not exist or holds a complete adapter.
Exit codes: 0 merged; 2 refused (bad arguments, inputs without or with disagreeing base digests,
a result rank above `--max-rank`, a base config that does not fit); anything else is a crash.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from adapters.tools.merge.plan import (
    COMBINATIONS,
    DEFAULT_MAX_RANK,
    SIDECAR,
    MergePlan,
    MergeRefused,
    adapter_digest,
    make_plan,
    parse_source,
)

EXIT_REFUSED = 2


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m adapters.tools.merge",
        description="Combine LoRA adapters (peft add_weighted_adapter) into a new adapter dir.",
    )
    ap.add_argument("--out", type=Path, required=True, help="new directory (must not exist)")
    ap.add_argument("--combination", choices=COMBINATIONS, default="cat")
    ap.add_argument(
        "--base-config",
        type=Path,
        required=True,
        help="the base model's config.json (or its directory); its weights are not needed",
    )
    ap.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK, help="engine max LoRA rank")
    ap.add_argument("--svd-rank", type=int, help="rank of an svd result (default: largest input)")
    ap.add_argument("sources", nargs="+", metavar="SRC_DIR:WEIGHT")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    out: Path = args.out.resolve()
    try:
        if out.exists():
            raise MergeRefused(f"{out} already exists; merges never overwrite")
        if not args.base_config.exists():
            raise MergeRefused(f"base config {args.base_config} does not exist")
        plan = make_plan(
            [parse_source(s) for s in args.sources],
            args.combination,
            max_rank=args.max_rank,
            svd_rank=args.svd_rank,
        )
        config = _build(plan, args.base_config, out)
    except MergeRefused as exc:
        print(f"merge refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    result = {
        "out": str(out),
        **plan.describe(),
        "alpha": config["lora_alpha"],
        "target_modules": config["target_modules"],
        "digest": adapter_digest(out),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def _build(plan: MergePlan, base_config: Path, out: Path) -> dict[str, object]:
    """Combine into a private sibling dir, add the sidecar, then rename it to `out`."""
    from adapters.tools.merge.combine import combine
    from adapters.tools.prepare import stdout_to_stderr

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".merging-{out.name}-", dir=out.parent))
    try:
        with stdout_to_stderr():  # library chatter must not mix with the result line
            config = combine(plan, base_config, work)
        sidecar = {"base_digest": plan.base_digest, "merge": plan.describe()}
        (work / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        work.chmod(0o755)  # mkdtemp makes it private; the engine may run as another user
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return config
