"""The store: SQLite behind one small interface.

:class:`~iotd.store.db.Store` runs every statement off the reactor thread
(one writer thread with group commit, a small pool of reader threads).
The SQL lives in plain functions ``fn(conn, ...)`` in the table-family
modules (:mod:`.keys`, :mod:`.devices`, :mod:`.events`) so the daemon and the
``iotd-admin`` CLI share it.
"""

from iotd.store.db import Store, StoreUnavailable, open_sync

__all__ = ["Store", "StoreUnavailable", "open_sync"]
