"""`loraplex route eval|train`: measure a classifier on labelled data, or fit and save one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import cast

from router.domain_router import CLASSIFIER_KINDS, ClassifierKind, DomainRouter, build_classifier
from router.eval import evaluate, format_report, load_label_map, save_confusion_png
from router.policy import DEFAULT_ROUTES, RoutesError, load_routes, read_examples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex route", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="accuracy, macro-F1, out-of-scope recall, latency")
    ev.add_argument("--data", type=Path, required=True, help='JSONL of {"text", "label"}')
    ev.add_argument("--label-map", type=Path, help="YAML: dataset label → domain (or null)")
    ev.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    ev.add_argument("--png", type=Path, help="confusion matrix image (default: beside --data)")
    tr = sub.add_parser("train", help="fit a classifier from the routes' examples and save it")
    tr.add_argument("--out", type=Path, required=True, help="artefact path (.npz)")
    for p in (ev, tr):
        p.add_argument("--routes", type=Path, default=DEFAULT_ROUTES, help="routes file")
        p.add_argument("--classifier", choices=CLASSIFIER_KINDS, default="tfidf")
    ev.add_argument("--artefact", type=Path, help="load (or fit and save) the classifier here")
    args = parser.parse_args(argv)
    kind = cast(ClassifierKind, args.classifier)
    try:
        policy = load_routes(args.routes)
        if args.command == "train":
            if kind == "keyword":
                parser.error("the keyword classifier has nothing to fit")
            args.out.unlink(missing_ok=True)
            build_classifier(policy, kind, args.out)
            print(args.out)
            return 0
        data = read_examples(args.data)
        label_map = load_label_map(args.label_map) if args.label_map else None
    except (RoutesError, OSError, ValueError) as exc:
        print(f"loraplex route: {exc}", file=sys.stderr)
        return 2
    router = DomainRouter(policy, build_classifier(policy, kind, args.artefact))
    report = evaluate(router, data, label_map)
    target: Path = args.png or args.data.with_name(f"{args.data.stem}.{kind}.confusion.png")
    png: Path | None = target
    try:
        save_confusion_png(report, target)
    except OSError as exc:  # e.g. a read-only data directory: the numbers still count
        print(f"loraplex route: confusion matrix image not saved: {exc}", file=sys.stderr)
        png = None
    if args.json:
        print(json.dumps(dict(report.to_dict(), confusion_png=png and str(png)), indent=2))
    else:
        print(format_report(report))
        print(f"\nconfusion matrix image: {png or 'not saved'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
