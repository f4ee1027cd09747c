"""The sync layer: how agents agree on parameters (settings, runners, the RMA store)."""

from .config import EASGD, DiLoCo, Downpour, Gossip, LocalSGD, Strategy, Sync, ZeRO

__all__ = ["Strategy", "Sync", "LocalSGD", "Downpour", "EASGD", "Gossip", "ZeRO", "DiLoCo"]
