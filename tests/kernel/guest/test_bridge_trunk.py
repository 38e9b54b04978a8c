"""meta-bridge's `vlanTrunk` and `preserveDefaultVlan` (with and without `vlan`) on a kernel with bridge VLAN
filtering. The host lane's kernel has none, so there the test only sees ours fail cleanly; here the port's VLAN
table is checked.

The test, its cases and the expected VLAN tables are in tests/delegates/test_bridge.py (upstream's behaviour:
Debian's reference plugins 1.1.1 have no vlanTrunk, so there is no reference to compare with); it is collected
here too by importing it with its fixture."""
from __future__ import annotations

from tests.delegates.test_bridge import env, test_vlan_trunk  # noqa: F401
