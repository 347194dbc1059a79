"""Prefetch: the first fetch of an artifact is already local.

The proxy sees the answer that names an artifact (a chat completion, a completed agent
execution) before the client asks for it. :mod:`proxy.prefetch.watch` picks the answers to
watch, :mod:`proxy.prefetch.scan` finds the references in them as they stream by, and
:mod:`proxy.prefetch.scheduler` fetches each one through the clients' own single-flight fill path
with the requester's credential, within limits of its own. A client asking meanwhile joins the
running fill; one asking later gets a hit.
"""

from proxy.prefetch.scheduler import Prefetcher
from proxy.prefetch.watch import Watch, observe

__all__ = ["Prefetcher", "Watch", "observe"]
