"""Which JetStream failures the Bus asks again (a leader moving), and how long it waits between attempts."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest

from podsweep.bus import MSG_ID_IN_PROCESS, SETTLE_MAX_DELAY_S, settle_delay, settled, unanswered


@pytest.mark.parametrize(
    ("exc", "asked_again"),
    [
        pytest.param(nats.errors.TimeoutError(), True, id="timeout"),
        pytest.param(TimeoutError(), True, id="asyncio-timeout"),
        pytest.param(nats.errors.NoRespondersError(), True, id="no-responders-direct-get"),
        pytest.param(nats.js.errors.NoStreamResponseError(), True, id="no-stream-response-publish"),
        pytest.param(nats.js.errors.ServiceUnavailableError(code=503), True, id="503-jetstream-unavailable"),
        pytest.param(nats.js.errors.APIError(code=503, err_code=10008), True, id="503-as-api-error"),
        pytest.param(nats.errors.ConnectionReconnectingError(), True, id="reconnecting"),
        pytest.param(nats.errors.StaleConnectionError(), True, id="stale-connection"),
        pytest.param(
            nats.js.errors.APIError(code=409, err_code=MSG_ID_IN_PROCESS), True, id="409-msg-id-still-in-process"
        ),
        pytest.param(nats.js.errors.KeyWrongLastSequenceError(), False, id="lost-compare-and-set"),
        pytest.param(nats.js.errors.KeyNotFoundError(), False, id="key-not-found-has-no-code"),
        pytest.param(nats.js.errors.NotFoundError(code=404, err_code=10059), False, id="stream-not-found"),
        pytest.param(nats.js.errors.BadRequestError(code=400, err_code=10058), False, id="stream-name-in-use"),
        pytest.param(nats.js.errors.APIError(code=409, err_code=10071), False, id="other-409"),
        pytest.param(nats.errors.ConnectionClosedError(), False, id="closed-by-us"),
        pytest.param(PermissionError("denied"), False, id="not-a-nats-error"),
    ],
)
def test_only_an_unanswered_request_is_asked_again(exc: BaseException, asked_again: bool) -> None:
    assert unanswered(exc) is asked_again


@pytest.mark.parametrize(
    ("attempt", "delay"),
    [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, SETTLE_MAX_DELAY_S), (6, SETTLE_MAX_DELAY_S), (500, 4.0)],
)
def test_the_pause_doubles_up_to_its_cap(attempt: int, delay: float) -> None:
    assert settle_delay(attempt) == delay


async def test_an_unanswered_call_is_asked_again_until_it_answers() -> None:
    calls = 0

    async def publish() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise nats.js.errors.NoStreamResponseError
        return "stored"

    assert await settled("publish", publish) == "stored"
    assert calls == 3


async def test_a_refusal_is_not_asked_again() -> None:
    calls = 0

    async def write() -> int:
        nonlocal calls
        calls += 1
        raise nats.js.errors.KeyWrongLastSequenceError

    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await settled("kv write", write)
    assert calls == 1


async def test_asking_again_is_bounded() -> None:
    calls = 0

    async def read() -> None:
        nonlocal calls
        calls += 1
        raise nats.errors.TimeoutError

    with pytest.raises(nats.errors.TimeoutError):
        await settled("kv read", read, within_s=0.5)
    assert calls == 2  # 0.25 s, then the next pause (0.5 s) would pass the bound
