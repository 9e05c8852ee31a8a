"""ugi-bids: uniGradICON registration for BIDS datasets, in world coordinates."""

__version__ = "0.1.0"
