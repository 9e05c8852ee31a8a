"""ugi-bids utils."""
