"""DeviceLink relay core: pure Twisted protocols, no threads.

- ``ctr``: the AES-256-CTR transform (a continuous stream per TCP direction, a
  fresh keystream per UDP datagram).
- ``tcp``: one link's TCP sockets -- a listening port, the single client
  connection and the connection to the device, with back-pressure both ways
  and half-close.
- ``udp``: one link's UDP sockets -- the client-facing port and a connected
  socket to the device, keeping datagram boundaries.
- ``tcp_sides``: the TCP link's protocols (client side, device side, the
  listening factory) and the eager writes.
- ``splice``: a plain TCP link relayed in the kernel (``splice(2)`` through a
  pipe per direction), the transports' readiness, pausing and half-close kept.
- ``ws_side``: a TCP link's client over a websocket on the HTTP port (the
  side, its transport-like pipe, the Autobahn factory).
- ``bucket``: the rate limit -- a token bucket per direction and the gate that
  pauses a TCP reader while its bucket is empty.
- ``link``: the ``Link`` -- what the REST layer shows, its counters (the
  relays report to it), its timers, its close and ``on_closed`` callbacks.
- ``links``: ``LinkManager`` (port allocation, limits, metrics flush, logs).
- ``service``: the manager's service (built from ``[devicelink]``).
- ``rows``: this node's links as rows of the store's ``links`` table (at open,
  refreshed when counters changed, removed at close; stale ones at start).
- ``directory``: every node's links for the REST layer (this node's from
  memory, live nodes' from the store) and closing one wherever it lives.
- ``forward``: the close request and answer between nodes (bus topic ``links``).
- ``reaper``: rows of nodes dead for 30 s leave the store.
- ``addresses``: which device addresses a link may reach
  (``allowed_device_networks``), and resolving a host name at connect time.

The hot path of both relays is ``dataReceived``/``datagramReceived`` ->
(cipher ``update``) -> peer ``write`` plus plain integer counters on the
``Link`` -- or, for a plain TCP link, two ``splice`` calls per chunk; Prometheus
counters are fed from those integers periodically and at close.
"""
