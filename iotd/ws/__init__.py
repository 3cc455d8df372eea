"""Websocket protocols: ELEMENT event sockets and iThings subscriptions."""
