"""The full-kernel lane: `test_full_kernel.py` (host) boots the Debian kernel under QEMU once and runs
`guest/` inside it. On the host the guest tests are not collected (they need ipvlan, 802.1q, dummy);
inside the guest (guest.sh sets META_CNI_GUEST=1) only they are."""
from __future__ import annotations

import os

IN_GUEST = os.environ.get("META_CNI_GUEST") == "1"

collect_ignore = ["test_full_kernel.py", "pybundle.py"] if IN_GUEST else ["guest", "pybundle.py"]
