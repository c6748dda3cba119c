"""A Job's traceparent annotation continues a trace only in its exact W3C form: anyone with access to the namespace
can write annotations."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from podsweep import telemetry

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_span_s_traceparent_round_trips_to_the_same_trace() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("create scan Job") as span:
        carried = telemetry.traceparent()
    assert carried is not None
    parent = trace.get_current_span(telemetry.from_traceparent(carried)).get_span_context()
    assert (parent.trace_id, parent.span_id) == (span.get_span_context().trace_id, span.get_span_context().span_id)


def test_no_current_span_carries_nothing() -> None:
    assert telemetry.traceparent() is None


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        VALID.upper(),
        VALID + "\n",
        VALID + "-extra",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-" + "z" * 32 + "-b7ad6b7169203331-01",
        "x" * 10_000,
    ],
    ids=[
        "missing",
        "empty",
        "upper-case",
        "trailing-newline",
        "extra-field",
        "unknown-version",
        "no-flags",
        "not-hex",
        "huge",
    ],
)
def test_a_malformed_traceparent_starts_no_trace(value: str | None) -> None:
    context = telemetry.from_traceparent(value)
    assert not trace.get_current_span(context).get_span_context().is_valid


def test_the_exact_form_is_read() -> None:
    context = telemetry.from_traceparent(VALID)
    assert trace.get_current_span(context).get_span_context().trace_id == int("0af7651916cd43dd8448eb211c80319c", 16)
