"""The HTTP side: one Klein app (``app.py``) and one module per REST area."""
