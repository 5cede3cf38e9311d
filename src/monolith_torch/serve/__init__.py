"""``monolith-torch serve``: predictions over HTTP from the folder a trainer publishes into, kept current.

``model`` (``ServedModel``: the run's model rebuilt from the newest full
snapshot's settings, a ``sync.Replica`` applying every delta after it, scoring
under its lock), ``batching`` (``Batcher``: concurrent requests parsed and
scored together on one thread), ``watch`` (``Watcher``: the thread that
follows the folder), ``metrics`` (``ServeMetrics``: Prometheus text), ``app``
(the Starlette app: /predict, /healthz, /metrics) and ``cli`` (the command).
docs/SERVING.md is the user's guide.

May import ``monolith_torch.train``, ``sync`` and ``core``; nothing below
imports it.
"""

from monolith_torch.serve.app import Limits, create_app
from monolith_torch.serve.batching import Batcher, Unavailable
from monolith_torch.serve.metrics import LATENCY_BUCKETS, ServeMetrics
from monolith_torch.serve.model import ServedModel, config_from_settings
from monolith_torch.serve.watch import Watcher

__all__ = [
    "LATENCY_BUCKETS",
    "Batcher",
    "Limits",
    "ServeMetrics",
    "ServedModel",
    "Unavailable",
    "Watcher",
    "config_from_settings",
    "create_app",
]
