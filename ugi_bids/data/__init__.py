"""ugi-bids data."""
