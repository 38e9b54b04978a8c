"""Running one delegate plugin: the Invoker seam.

`exec` runs any CNI binary found on CNI_PATH; `builtin` runs meta-cni's own delegates in-process. Chains (conflists) are driven by `chain.py` over either invoker.
"""
from __future__ import annotations

from typing import Protocol

import attrs


@attrs.frozen
class Invocation:
    """The CNI_* environment of one plugin call, plus `where` (what the call is for, in messages)."""

    command: str
    container_id: str
    netns: str
    ifname: str
    cni_args: str
    path: tuple[str, ...]
    where: str


class Invoker(Protocol):
    """Runs delegates. An invoker may also offer `in_process(plugin_type) -> bool` (the built-in one and
    the daemon's metering wrapper do): core makes in-process attachments in its own thread."""

    def run(self, plugin_type: str, stdin: bytes, inv: Invocation) -> bytes:
        """Run the plugin; its stdout on success, a CNIError otherwise."""
