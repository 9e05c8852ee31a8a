"""ugi-bids workflows."""
