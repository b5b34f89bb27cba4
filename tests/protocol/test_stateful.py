"""The reusable balloon-protocol state machine, run against this package's device/driver."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from protocol.testing.stateful import BalloonProtocolMachine

TestBalloonProtocol = BalloonProtocolMachine.TestCase
TestBalloonProtocol.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
