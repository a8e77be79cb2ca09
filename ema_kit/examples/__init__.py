"""Examples, not the library: the demo (``python -m ema_kit demo``), its model, and the digits."""
