"""ugi-bids cli."""
