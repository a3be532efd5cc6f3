"""The values that cross module boundaries behave as the dataclasses they are declared as, compiled
(their constructors are written out for speed) and from source (test_native runs this file that way)."""

from __future__ import annotations

import dataclasses

import pytest

from gateway import model
from gateway.model import MessageFacts
from gateway.pipeline import Outcome

ARGS = ("xray-0001", "xray", "acme", "LHR", "site/LHR/xray-0001/result", "result", 120,
        (("verdict", "operational"), ("bag_id", "identifier")))


def test_the_probe_knows_how_the_module_was_loaded() -> None:
    assert model.COMPILED == (not model.__file__.endswith(".py"))


def test_message_facts_are_a_frozen_dataclass() -> None:
    f = MessageFacts(*ARGS)
    names = [fd.name for fd in dataclasses.fields(MessageFacts)]
    assert names == ["device_id", "device_type", "vendor", "site", "topic", "stream", "size", "fields"]
    assert dataclasses.astuple(f) == ARGS
    assert f == MessageFacts(**dict(zip(names, ARGS))) and hash(f) == hash(MessageFacts(*ARGS))
    assert f != dataclasses.replace(f, size=121)
    assert repr(f).startswith("MessageFacts(device_id='xray-0001', device_type='xray'")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        MessageFacts(*ARGS[:-1])  # type: ignore[call-arg]


def test_an_outcome_starts_empty_and_owns_its_lists() -> None:
    a, b = Outcome("d-1", "s", 1, 2), Outcome("d-2", "s", 3, 4, reason="guard.too_large")
    assert (a.reason, a.duplicate, a.deliveries) == ("", False, [])
    assert (a.decision, a.facts, a.record) == (None, None, {})
    assert b.reason == "guard.too_large"
    a.deliveries.append(object())  # type: ignore[arg-type]
    a.record["x"] = 1
    assert b.deliveries == [] and b.record == {}
