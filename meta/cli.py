"""`metactl`: the operator's command line (validate manifests, run the demo)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _validate(args: argparse.Namespace) -> int:
    from .lint import validate

    problems, count = validate([Path(p) for p in args.files], Path(args.conf_dir) if args.conf_dir else None)
    for p in problems:
        print(p)
    print(f"{count} object(s) checked, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(cni_path=args.cni_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metactl", description="meta-cni operator tool")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="lint NetworkAttachmentDefinition and Pod manifests offline")
    v.add_argument("files", nargs="+", help="YAML/JSON manifest files or directories")
    v.add_argument("--conf-dir", help="CNI config dir for NADs with an empty spec.config")
    v.set_defaults(func=_validate)
    d = sub.add_parser("demo", help="attach demo pods to three networks through meta-cni, prove traffic, clean up")
    d.add_argument("--cni-path", default="/usr/lib/cni", help="where the reference host-local IPAM plugin is")
    d.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
