"""Devices that kubelet allocated to a pod, read from the device manager's checkpoint file.

A NAD annotated with `k8s.v1.cni.cncf.io/resourceName` (an SR-IOV VF pool, say) needs the device that
kubelet handed to this pod; kubelet records its allocations in
`/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint` (JSON), which works without the API.
"""
from __future__ import annotations

import json
from pathlib import Path

from .cni.errors import INVALID_CONFIG, CNIError


def allocated(checkpoint: Path, pod_uid: str | None) -> dict[str, list[str]]:
    """Resource name -> device IDs allocated to the pod, in kubelet's order. Empty when nothing is known."""
    if not pod_uid:
        return {}
    try:
        data = json.loads(checkpoint.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CNIError(INVALID_CONFIG, f"kubelet checkpoint {checkpoint} is unreadable: {e}") from None
    entries = ((data.get("Data") or {}).get("PodDeviceEntries") or []) if isinstance(data, dict) else []
    out: dict[str, list[str]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("PodUID") != pod_uid:
            continue
        ids = entry.get("DeviceIDs") or []
        # Older kubelets store a list; newer ones a map from NUMA node to list.
        flat = [d for group in ids.values() for d in group] if isinstance(ids, dict) else list(ids)
        devices = out.setdefault(str(entry.get("ResourceName")), [])
        devices.extend(d for d in flat if isinstance(d, str) and d not in devices)
    return out
