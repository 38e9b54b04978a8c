"""Built-in delegate plugins (bridge, macvlan, ipvlan) run in-process by meta-cni; not yet implemented."""
