"""meta-ipam: cluster-wide IP address management for secondary networks.

State is sharded into blocks (small CIDRs of a pool) leased to nodes, each a separate object written with
optimistic concurrency, so no allocation takes a cluster-wide lock and no object grows with the pool.
The same allocator runs over two stores: Kubernetes custom resources (`kubestore`) and local files under
a file lock (`filestore`, standalone mode). `collect` decides what garbage collection may free: CNI GC in
the plugin, and the node daemon's collector of addresses whose pod is gone (meta/daemon/ipamgc.py).
"""
