"""End-to-end test harness: network namespaces, staged source, a tiny DNS server.

Everything here runs as root on the test machine and only ever talks to loopback
and to namespaces it created itself.
"""

from __future__ import annotations

from .netns import Topology, cleanup_leftovers
from .source import python_bin, stage_source

__all__ = ["Topology", "cleanup_leftovers", "python_bin", "stage_source"]
