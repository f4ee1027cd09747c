"""Helpers for testing distributed code on one machine (simulated hosts)."""

from .simulated_hosts import SUBNET, SimulatedHosts, unavailable_reason

__all__ = ["SimulatedHosts", "unavailable_reason", "SUBNET"]
