"""kvrouter: a cache-aware load balancer and router for fleets of vLLM replicas."""

__version__ = "0.1.0"
