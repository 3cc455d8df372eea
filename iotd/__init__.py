"""iotd: one daemon for push commands, device links, event streams and subscriptions."""

__version__ = "0.1.0"
