"""ugi-bids interfaces."""
