"""`metactl`: the operator's command line (validate manifests, run the demo, the node daemon and its installer)."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _validate(args: argparse.Namespace) -> int:
    from .lint import validate

    problems, count = validate([Path(p) for p in args.files], Path(args.conf_dir) if args.conf_dir else None)
    for p in problems:
        print(p)
    print(f"{count} object(s) checked, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run()


def _webhook(args: argparse.Namespace) -> int:
    from . import webhook

    return webhook.main(args.cert, args.key, args.address, args.port)


def _daemon(args: argparse.Namespace) -> int:
    from .daemon import app

    opts = app.Options(
        socket=Path(args.socket), metrics_address=args.metrics_address or None, kubeconfig=args.kubeconfig,
        node_name=args.node_name or os.environ.get("NODE_NAME") or None, max_concurrent=args.max_concurrent,
        max_wait=args.max_wait, cni_dirs=tuple(args.cni_dir or app.Options().cni_dirs),
        replay_interval=args.replay_interval, api_timeout=args.api_timeout, ipam_gc_interval=args.ipam_gc_interval,
        attach_workers=args.attach_workers,
    )
    return app.run(opts, args.log_level)


def _install(args: argparse.Namespace) -> int:
    from .daemon import install

    conf_dir = Path(args.conf_dir)
    kubeconfig = None
    if args.kubeconfig_from_serviceaccount:
        kubeconfig = Path(args.kubeconfig_file) if args.kubeconfig_file else conf_dir / "meta-cni.d" / "meta-cni.kubeconfig"
    try:
        written = install.install(Path(args.bin_dir), conf_dir, Path(args.config), kubeconfig, Path(args.serviceaccount_dir),
                                  args.python)
    except (install.InstallError, OSError) as e:
        print(f"metactl install: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"installed {path}")
    return 0


def _ipam(args: argparse.Namespace) -> int:
    from .cni.errors import CNIError
    from .ipam import admin
    from .ipam.store import Unavailable

    try:
        if args.kubeconfig:
            from .ipam.kubestore import KubeStore

            store: Any = KubeStore.from_kubeconfig(args.kubeconfig, args.api_timeout)
        else:
            from .ipam.filestore import FileStore

            store = FileStore(args.data_dir)
        if args.ipam_command == "pools":
            out = admin.pools(store, args.pool)
        elif args.ipam_command == "allocations":
            out = admin.allocations(store, args.pool)
        else:
            out = admin.release(store, args.pool, args.ip)
    except (admin.AdminError, Unavailable, CNIError, ImportError) as e:
        print(f"metactl ipam: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    return 0


def _positive(kind: type, *, zero_ok: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero_ok else 'greater than 0'}, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metactl", description="meta-cni operator tool")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="lint NetworkAttachmentDefinition and Pod manifests offline")
    v.add_argument("files", nargs="+", help="YAML/JSON manifest files or directories")
    v.add_argument("--conf-dir", help="CNI config dir for NADs with an empty spec.config")
    v.set_defaults(func=_validate)
    d = sub.add_parser("demo", help="attach demo pods to three networks through meta-cni, prove traffic, clean up")
    d.set_defaults(func=_demo)
    w = sub.add_parser("webhook", help="serve the NetworkAttachmentDefinition validating admission webhook (HTTPS)")
    w.add_argument("--cert", required=True, help="PEM server certificate (chain); reloaded when the file changes")
    w.add_argument("--key", required=True, help="PEM private key of --cert")
    w.add_argument("--address", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    w.add_argument("--port", type=int, default=8443, help="port to listen on (default 8443; 0 picks a free one)")
    w.set_defaults(func=_webhook)
    dm = sub.add_parser("daemon", help="run the per-node daemon that the meta-cni shim forwards CNI requests to")
    dm.add_argument("--socket", default="/run/meta-cni/daemon.sock",
                    help="unix socket for CNI requests (the config's daemonSocket)")
    dm.add_argument("--metrics-address", default="127.0.0.1:9095",
                    help="HOST:PORT for /metrics, /healthz and /readyz over TCP ('' turns it off; they stay on the socket)")
    dm.add_argument("--kubeconfig", help="the daemon's API credentials (default: in-cluster when run in a pod, else "
                                         "the kubeconfig named by the meta-cni config)")
    dm.add_argument("--node-name", help="node whose pods are watched (default: $NODE_NAME)")
    dm.add_argument("--max-concurrent", type=_positive(int), default=8, help="CNI requests run at once (default 8)")
    dm.add_argument("--max-wait", type=float, default=30.0,
                    help="seconds a request may wait for its turn before it gets CNI error 11 (default 30)")
    dm.add_argument("--cni-dir", action="append", help="cniDir whose spooled DELs are replayed at start-up "
                                                       "(repeatable; default /var/lib/cni/meta-cni)")
    dm.add_argument("--replay-interval", type=_positive(float), default=30.0,
                    help="seconds between retries of spooled DELs that failed (default 30)")
    dm.add_argument("--api-timeout", type=_positive(float), help="budget of one API call (default: the config's apiTimeout)")
    dm.add_argument("--ipam-gc-interval", type=_positive(float, zero_ok=True), default=60.0,
                    help="seconds between rounds of meta-ipam's garbage collector, which frees this node's addresses "
                         "whose pod is gone (needs the daemon's own API credentials; 0 turns it off; default 60)")
    dm.add_argument("--attach-workers", type=_positive(int, zero_ok=True), default=2,
                    help="worker processes that make a pod's built-in attachments side by side (default 2; 0: "
                         "every attachment in the request's own thread)")
    dm.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    dm.set_defaults(func=_daemon)
    ins = sub.add_parser("install", help="install the meta-cni shim and its config on the node (DaemonSet init container)")
    ins.add_argument("--bin-dir", required=True, help="CNI bin dir to write the meta-cni executable into")
    ins.add_argument("--conf-dir", required=True, help="the runtime's CNI conf dir to copy --config into")
    ins.add_argument("--config", required=True, help="CNI config (conf or conflist) whose meta-cni plugin has daemonSocket")
    ins.add_argument("--kubeconfig-from-serviceaccount", action="store_true",
                     help="also write a kubeconfig from this pod's service account")
    ins.add_argument("--kubeconfig-file", help="where that kubeconfig goes (default CONF_DIR/meta-cni.d/meta-cni.kubeconfig)")
    ins.add_argument("--python", default="/usr/bin/python3",
                     help="the node's python3, for the shim's shebang line (default /usr/bin/python3)")
    ins.add_argument("--serviceaccount-dir", default="/var/run/secrets/kubernetes.io/serviceaccount", help=argparse.SUPPRESS)
    ins.set_defaults(func=_install)
    ip = sub.add_parser("ipam", help="meta-ipam pools and allocations; release an address by hand")
    where = ip.add_mutually_exclusive_group()
    where.add_argument("--data-dir", default="/var/lib/cni/meta-ipam", help="the standalone store (default %(default)s)")
    where.add_argument("--kubeconfig", help="the cluster store (custom resources) through this kubeconfig")
    ip.add_argument("--api-timeout", type=_positive(float), default=10.0, help="budget of one API call (default 10)")
    ipsub = ip.add_subparsers(dest="ipam_command", required=True)
    ipsub.add_parser("pools", help="size, used, free and block leases by node of every pool").add_argument(
        "pool", nargs="?", help="only this pool (its network_name)")
    ipsub.add_parser("allocations", help="every allocation and its owner").add_argument(
        "pool", nargs="?", help="only this pool (its network_name)")
    rel = ipsub.add_parser("release", help="free one address, whoever holds it (sticky ones too)")
    rel.add_argument("pool", help="the pool (network_name)")
    rel.add_argument("ip", help="the address to free")
    ip.set_defaults(func=_ipam)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
