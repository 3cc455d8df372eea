"""Websocket jobs: ELEMENT event sockets and iThings subscriptions.

Each kind is a job module (``element_job``, ``subscribe_job``: its routes and
its service) over its factory and protocol (``element``, ``subscribe``);
what both kinds share is ``protocol`` (one socket), ``factory`` (one kind's
sockets, the bus subscription, the service), ``limits`` (the connection caps
of both kinds) and ``upgrade`` (the checks before an upgrade).  Nothing here
imports :mod:`iotd.web`.
"""
