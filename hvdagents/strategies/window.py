"""The RMA windows, under their first home: :mod:`hvdagents.strategies.windows` holds them now,
one module per window kind. Kept so that ``from hvdagents.strategies.window import ...`` works."""

from .windows import RETIRED, SUPPORTED_DTYPES, ClockWindow, InboxWindow, ParameterWindow, PeerWindow

__all__ = ["ParameterWindow", "PeerWindow", "InboxWindow", "ClockWindow", "RETIRED", "SUPPORTED_DTYPES"]
