"""The web console's static files (package data, served by :mod:`iotd.web.console`).

Plain ES modules, one stylesheet and the page; no build step.  ``app.js``
starts it: sign-in, the router and the live subscription socket; each view
is a module (``devices.js``, ``device.js``, ``links.js``, ``events.js``).
"""
