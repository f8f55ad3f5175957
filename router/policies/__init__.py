"""Routing policies: one file per policy behind one Protocol (`base.Policy`), built by `registry`.

Rules for everything under this package: sans-I/O. No asyncio, no sockets, no threads, no clock: time
is the `now` argument. A policy reads the `Fleet` (router/fleet.py) and returns a `Decision`; the
Fleet, not the policy, records the routing and calls the policy's lifecycle hooks.

This module imports only `base`, so that `router.fleet` (which needs `RequestView` and `Decision`)
can import it without pulling in the policies that in turn read the Fleet.
"""

from router.policies.base import Decision, NoReplicaAvailable, Policy, PolicyBase, RequestView, make_request

__all__ = ["Decision", "NoReplicaAvailable", "Policy", "PolicyBase", "RequestView", "make_request"]
