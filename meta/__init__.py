"""meta-cni: a multi-network meta CNI plugin for Kubernetes."""
