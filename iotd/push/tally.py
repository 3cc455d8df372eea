"""The command metrics: ``iotd_commands_total{state}`` (transitions), ``iotd_commands_in_state{state}``,
``iotd_push_polls_total{outcome=idle|busy|command}`` and ``iotd_push_results_total{outcome=done|failed|
malformed|orphan}``.

The gauges start from the store's counts at load; queued and sent are set
again from every refresh (they may change in another process), the others
follow this node's own transitions.
"""

from __future__ import annotations

from iotd import metrics
from iotd.push.state import STATES

# metric children bound once (labels() costs a lock and a lookup per call)
_transitions = {s: metrics.commands.labels(s) for s in STATES}
_in_state = {s: metrics.commands_by_state.labels(s) for s in STATES}
polls = {o: metrics.polls.labels(o) for o in ("idle", "busy", "command")}
results = {o: metrics.results.labels(o) for o in ("done", "failed", "malformed", "orphan")}
idle = polls["idle"]


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {s: 0 for s in STATES}

    def load(self, counts: dict[str, int]) -> None:
        for state in STATES:
            self.counts[state] = counts.get(state, 0)
            _in_state[state].set(self.counts[state])

    def unfinished(self, counts: dict[str, int]) -> None:
        """The store's counts of queued and sent commands (every process's changes)."""
        for state in ("queued", "sent"):
            self.counts[state] = counts.get(state, 0)
            _in_state[state].set(self.counts[state])

    def moved(self, old: str | None, new: str) -> None:
        """One transition committed (``old`` None: a command was queued)."""
        if old is not None:
            self.counts[old] -= 1
            _in_state[old].dec()
        self.counts[new] += 1
        _in_state[new].inc()
        _transitions[new].inc()

    @staticmethod
    def resent() -> None:
        _transitions["sent"].inc()
