"""Parity of the built-in delegates (meta-bridge, meta-macvlan) with the reference CNI plugins.

Each case runs the reference plugin and ours on the same input, one after the other, each in a fresh
"host" network namespace and a fresh container namespace, then compares the ADD result, the network
state left by ADD (snapshot.py) and the state left by DEL.
"""
