"""A loopback HTTP receiver for webhook tests: verifies each generic webhook's HMAC signature and records every request.

A request whose client had gone (timed out, killed) by the time the receiver answered is recorded as aborted, never
as accepted, so "accepted twice" means the sender really delivered twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import msgspec
from aiohttp import web

from podsweep.embedded import free_port
from schemas.alerts import AlertPayload
from services.notifier import signing


@dataclass
class Arrival:
    path: str
    key: str
    status: int
    verified: bool
    body: bytes
    at: float
    aborted: bool = False
    form: dict[str, list[str]] = field(default_factory=dict)
    file: bytes = b""
    authorization: str = ""


class Receiver:
    """A loopback HTTP receiver. `plan[path]` lists responses for successive requests: an int status,
    ("retry-after", status, value), ("hang", seconds), ("hold",) (answer 200 once `release` is set) or "dojo"; when a
    plan runs out it answers 200."""

    def __init__(self, port: int | None = None, *, hmac_key: str = "", dojo_token: str = "") -> None:
        self.hmac_key = hmac_key
        self.dojo_token = dojo_token
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.plan: dict[str, list[object]] = {}
        self.arrivals: list[Arrival] = []
        self.delay_s = 0.0
        self.release = asyncio.Event()
        self.on_arrival: Callable[[Arrival], None] | None = None  # called as each request arrives, before answering
        # Slack-like throttling per path: (seconds between messages, Retry-After): a request sooner than that after
        # the last accepted one is answered 429 with that Retry-After.
        self.rate_limit: dict[str, tuple[float, str]] = {}
        self._last_accepted: dict[str, float] = {}
        self._runner: web.AppRunner | None = None

    def accepted(self, path: str | None = None) -> list[Arrival]:
        return [a for a in self.arrivals if 200 <= a.status < 300 and not a.aborted and path in (None, a.path)]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = request.headers.get(signing.IDEMPOTENCY_HEADER, "")
        verified = False
        form: dict[str, list[str]] = {}
        file = b""
        if request.content_type == "multipart/form-data":
            form, file = await _multipart(request, body)
        else:
            try:
                signing.verify(
                    [self.hmac_key.encode()], body, request.headers.get(signing.SIGNATURE_HEADER), int(time.time())
                )
                verified = True
            except signing.SignatureError:
                verified = False
        arrival = Arrival(
            path=request.path,
            key=key,
            status=0,  # not answered yet
            verified=verified,
            body=body,
            at=time.monotonic(),
            form=form,
            file=file,
            authorization=request.headers.get("Authorization", ""),
        )
        self.arrivals.append(arrival)
        if self.on_arrival is not None:
            self.on_arrival(arrival)
        steps = self.plan.get(request.path, [])
        step = steps.pop(0) if steps else 200
        headers: dict[str, str] = {}
        if request.path in self.rate_limit:
            interval, retry_after = self.rate_limit[request.path]
            if arrival.at - self._last_accepted.get(request.path, -1e9) < interval:
                step = ("retry-after", 429, retry_after)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if isinstance(step, tuple) and step[0] == "hold":
            await self.release.wait()
            status = 200
        elif isinstance(step, tuple) and step[0] == "hang":
            await asyncio.sleep(float(step[1]))
            status = 200
        elif isinstance(step, tuple) and step[0] == "retry-after":
            status, headers = int(step[1]), {"Retry-After": str(step[2])}
        elif step == "dojo":
            status, problems = dojo_contract(request.path, arrival, self.dojo_token)
            if problems:
                arrival.status = status
                return web.json_response({"errors": problems}, status=status)
        else:
            status = int(step)  # type: ignore[call-overload]
        transport = request.transport
        arrival.aborted = transport is None or transport.is_closing()
        arrival.status = status
        if 200 <= status < 300 and not arrival.aborted:
            self._last_accepted[request.path] = arrival.at
        return web.Response(status=status, headers=headers, text="{}", content_type="application/json")


async def _multipart(request: web.Request, body: bytes) -> tuple[dict[str, list[str]], bytes]:
    from aiohttp import BodyPartReader, MultipartReader
    from aiohttp.streams import StreamReader

    stream = StreamReader(request.protocol, len(body) + 1, loop=asyncio.get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    reader = MultipartReader(request.headers, stream)
    form: dict[str, list[str]] = {}
    file = b""
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader)
        if part.filename is not None:
            form.setdefault("__file_name__", []).append(part.filename)
            file = await part.read()
        else:
            form.setdefault(part.name or "", []).append((await part.read()).decode())
    return form, file


DOJO_FIELDS = {
    "scan_type", "product_name", "engagement_name", "test_title", "auto_create_context", "scan_date",
    "minimum_severity", "active", "verified", "close_old_findings", "version", "build_id", "tags",
    "product_type_name", "engagement", "test", "__file_name__",
}  # fmt: skip


def dojo_contract(path: str, arrival: Arrival, dojo_token: str) -> tuple[int, list[str]]:
    """DefectDojo's documented API v2 import-scan / reimport-scan contract, as far as a receiver can check it:
    `Authorization: Token <key>`; multipart with `scan_type` (a parser name), `file`; the target as `engagement`
    (import) or `test` (reimport) id, or by name with `auto_create_context` (product_name + engagement_name, and
    for reimport the test by `test_title`); `scan_date` YYYY-MM-DD; `minimum_severity` one of Info..Critical;
    booleans as true/false. Unknown fields are reported (DefectDojo ignores them, so a typo would go unnoticed)."""
    problems: list[str] = []
    if path not in ("/api/v2/import-scan/", "/api/v2/reimport-scan/"):
        return 404, [f"no endpoint {path}"]
    if arrival.authorization != f"Token {dojo_token}":
        return 401, ["Authentication credentials were not provided or are wrong"]
    form = arrival.form
    one = {k: v[0] for k, v in form.items() if len(v) == 1}
    problems += [f"unknown field {k}" for k in form if k not in DOJO_FIELDS]
    problems += [f"field {k} given {len(v)} times" for k, v in form.items() if len(v) > 1 and k != "tags"]
    if one.get("scan_type") != "Trivy Scan":
        problems.append(f"scan_type {one.get('scan_type')!r} is not the Trivy parser")
    if not arrival.file:
        problems.append("file is required")
    else:
        try:
            json.loads(arrival.file)
        except ValueError:
            problems.append("file is not JSON")
    by_name = one.get("auto_create_context") == "true" and one.get("product_name") and one.get("engagement_name")
    if path.endswith("reimport-scan/") and not (one.get("test") or (by_name and one.get("test_title"))):
        problems.append("reimport needs test, or product_name + engagement_name + test_title + auto_create_context")
    if path.endswith("/import-scan/") and not (one.get("engagement") or by_name):
        problems.append("import needs engagement, or product_name + engagement_name + auto_create_context")
    try:
        datetime.strptime(one.get("scan_date", ""), "%Y-%m-%d")
    except ValueError:
        problems.append(f"scan_date {one.get('scan_date')!r} is not YYYY-MM-DD")
    if one.get("minimum_severity", "Info") not in ("Info", "Low", "Medium", "High", "Critical"):
        problems.append("minimum_severity is not one of Info, Low, Medium, High, Critical")
    for flag in ("active", "verified", "close_old_findings", "auto_create_context"):
        if flag in one and one[flag] not in ("true", "false"):
            problems.append(f"{flag} must be true or false")
    return (400, problems) if problems else (201, [])


def signed_alerts(receiver: Receiver, path: str = "/hook") -> dict[str, list[AlertPayload]]:
    """The alerts accepted on `path` by idempotency key; each must carry a valid signature."""
    by_key: dict[str, list[AlertPayload]] = {}
    for arrival in receiver.accepted(path):
        assert arrival.verified, "a webhook arrived without a valid signature"
        by_key.setdefault(arrival.key, []).append(msgspec.json.decode(arrival.body, type=AlertPayload))
    return by_key


def write_hook_policy(file: Path, receiver: Receiver, key_env: str) -> Path:
    """A notifier policy sending every image with a CRITICAL finding to `receiver`'s /hook, signed with the key in
    the environment variable `key_env` (so the key is never in Settings)."""
    file.write_text(
        "version: 1\ndefaults:\n  threshold: {max_critical: 0}\n  destinations: [hook]\ndestinations:\n"
        f'  - {{name: hook, kind: webhook, url: "{receiver.url}/hook", hmac_key: {{env: {key_env}}}}}\n'
    )
    return file
