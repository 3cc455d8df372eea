"""The rate limit's token bucket and the TCP reading gate, and the link lifetime, on a Clock."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import task

from iotd.relay.bucket import Bucket, Gate, chunk_size
from relay_helpers import make_manager, open_link, port_is_free, reactor, within  # noqa: F401  (fixtures)


def test_bucket_bursts_one_second_then_refills_at_the_rate():
    clock = task.Clock()
    bucket = Bucket(1000, clock)
    assert bucket.allow(600) and bucket.allow(400)
    assert not bucket.allow(1)  # a refused datagram takes nothing
    clock.advance(0.5)
    assert bucket.allow(500) and not bucket.allow(1)
    clock.advance(60)
    assert bucket.allow(1000) and not bucket.allow(1)  # never more than one second's worth


def test_charge_goes_into_debt_and_names_the_wait():
    clock = task.Clock()
    bucket = Bucket(1000, clock)
    assert bucket.charge(900, reserve=100) == 0.0
    assert bucket.charge(300, reserve=100) == 0.3  # -200 -> +100 at 1000/s
    assert chunk_size(100_000, 128 * 1024) == 10_000 and chunk_size(10, 128 * 1024) == 1024


class FakeTransport:
    def __init__(self):
        self.paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        pass


def test_gate_resumes_only_when_neither_the_bucket_nor_the_peer_holds_it():
    clock = task.Clock()
    transport = FakeTransport()
    gate = Gate(transport, Bucket(1000, clock), chunk=100)
    count = gate.counter(lambda n: None)
    count(1000)
    assert transport.paused
    gate.pauseProducing()  # and the peer's queue is full
    clock.advance(0.2)
    assert transport.paused  # tokens are back, the peer still holds it
    gate.resumeProducing()
    assert not transport.paused
    count(1000)
    assert transport.paused
    gate.pauseProducing()
    gate.resumeProducing()
    assert transport.paused  # the peer let go, the bucket has not
    clock.advance(1.0)
    assert not transport.paused
    gate.stop()
    count(5000)
    assert not transport.paused and not clock.getDelayedCalls()


@pytest_twisted.inlineCallbacks
def test_max_duration_closes_a_link_in_use_or_not(reactor, make_manager):
    clock = task.Clock()
    manager = make_manager(clock=clock, unused_ttl=600.0)
    link = open_link(manager, "tcp", 9, max_duration_ms=2500)
    assert link.expires_at == link.created_at + 2.5
    assert link.to_json()["maxDuration"] == 2500 and "expiresAt" in link.to_json()
    link.mark_used()
    clock.advance(2.4)
    assert not link.closed
    clock.advance(0.1)
    assert link.closed and link.close_reason == "max_duration"
    yield within(reactor, link.when_closed())
    assert port_is_free(link.port, "tcp")
    forever = open_link(manager, "udp", 9)
    assert forever.expires_at is None and "expiresAt" not in forever.to_json()
