"""Push: commands for devices that poll (spec 10).

- :mod:`iotd.push.state` -- the command state machine (statuses, transition table);
- :mod:`iotd.push.command` -- a command snapshot and its ``/push`` answer and events;
- :mod:`iotd.push.results` -- what a ``/result`` body means, kept storable;
- :mod:`iotd.push.transactions` -- every change as one checked store transaction;
- :mod:`iotd.push.work` -- which devices have unfinished work (idle polls from memory);
- :mod:`iotd.push.presence` -- online/offline and ``conn`` events;
- :mod:`iotd.push.waiters` -- ``?wait=`` requests;
- :mod:`iotd.push.sweeps` -- timers: last attempts that timed out, offline devices;
- :mod:`iotd.push.service` -- :class:`CommandService`, the facade the web layer calls.
"""

from iotd.push.command import Command
from iotd.push.results import parse_result
from iotd.push.service import CommandService
from iotd.push.state import STATES, Status, Transition

__all__ = ["Command", "CommandService", "STATES", "Status", "Transition", "parse_result"]
