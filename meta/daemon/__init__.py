"""The per-node daemon (thick mode): `meta-cni` forwards each CNI call over a unix socket to one long-lived
process that keeps watch caches, delegates and metrics warm.

This package's `__init__`, `protocol` and `spool` are standard library only: the shim imports them on every
forwarded call. Everything else here is imported by `metactl daemon` / `metactl install` alone.
"""
