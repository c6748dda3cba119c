"""List-then-watch of one Kubernetes resource, as raw bytes decoded by the caller's msgspec codec.

I/O only: it never decides what a change means. Pages of a list are yielded as they arrive, the next one already
requested (so 50k pods are never held at once), then the watch resumes from the list's resourceVersion with
bookmarks. A dropped connection or an API server restart resumes the watch from the last resourceVersion seen; only
`410 Gone` (history compacted) relists.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import aiohttp
from opentelemetry import metrics

from podsweep import logs
from podsweep.kube import Kube, KubeError

T = TypeVar("T")

log = logs.get("podsweep.watcher.reflector")
meter = metrics.get_meter("podsweep.watcher")
relists = meter.create_counter("podsweep_watcher_relists", description="Full relists, by resource and cause")


class Codec(Protocol[T]):
    """Decodes one resource's list pages and watch lines (see services/watcher/kubeobjects.py)."""

    def decode_page(self, data: bytes) -> tuple[list[T], str, str]:
        """(items, continue token, resourceVersion)."""
        ...

    def decode_line(self, line: bytes) -> tuple[str, T | None, str, int]:
        """(type, object or None, resourceVersion or "", error code or 0)."""
        ...


@dataclass(frozen=True)
class ListStarted:
    """A (re)list begins: what follows until ListDone is the complete current set."""

    cause: str


@dataclass(frozen=True)
class ListPage(Generic[T]):
    items: list[T]


@dataclass(frozen=True)
class ListDone:
    resource_version: str


@dataclass(frozen=True)
class Changed(Generic[T]):
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    obj: T


Observation = ListStarted | ListPage[T] | ListDone | Changed[T]


class _Gone(Exception):
    pass


async def reflect(
    kube: Kube,
    path: str,
    codec: Codec[T],
    *,
    params: Mapping[str, str | int | bool] | None = None,
    page_size: int = 500,
    watch_timeout_s: int = 300,
    max_backoff_s: float = 30.0,
    accept: str = "application/json",
    watch_accept: str | None = None,
) -> AsyncIterator[Observation[T]]:
    """Forever: list (paged), then watch; cancel the consuming task to stop. `watch_accept` (default `accept`): a
    metadata-only reflector lists PartialObjectMetadataList and watches PartialObjectMetadata.

    A failure in the middle of a list starts it again with a new ListStarted: consumers drop the partial set.
    """
    base = dict(params or {})
    resource = path.rstrip("/").rsplit("/", 1)[-1]
    rv = ""
    cause = "start"
    failures = 0
    while True:
        try:
            if not rv:
                relists.add(1, {"resource": resource, "cause": cause})
                yield ListStarted(cause)
                list_rv = ""
                pages = size = 0
                waited = decoding = 0.0  # seconds waiting for the API server, and decoding what it sent
                began = time.perf_counter()
                # The next page is requested before this one is handed on, so the API server encodes page n+1
                # while the consumer works on page n (about a third of a 50k-pod first sync was waiting).
                page = asyncio.ensure_future(kube.get(path, {**base, "limit": page_size}, accept=accept))
                try:
                    while True:
                        at = time.perf_counter()
                        data = await page
                        decode_at = time.perf_counter()
                        items, token, page_rv = codec.decode_page(data)
                        waited += decode_at - at
                        decoding += time.perf_counter() - decode_at
                        pages, size = pages + 1, size + len(data)
                        del data
                        list_rv = page_rv or list_rv
                        if token:
                            query = {**base, "limit": page_size, "continue": token}
                            page = asyncio.ensure_future(kube.get(path, query, accept=accept))
                        yield ListPage(items)
                        if not token:
                            break
                finally:
                    if not page.done():
                        page.cancel()
                    elif not page.cancelled():
                        page.exception()  # a prefetched page that failed is reported by the relist, not as unhandled
                rv = list_rv  # only a finished list may start a watch; a failure mid-list relists
                yield ListDone(rv)
                log.info(
                    "list done",
                    resource=resource,
                    resource_version=rv,
                    cause=cause,
                    pages=pages,
                    mb=round(size / 1e6, 1),
                    s=round(time.perf_counter() - began, 2),
                    waiting_s=round(waited, 2),
                    decoding_s=round(decoding, 2),
                )
            query = {
                **base,
                "resourceVersion": rv,
                "allowWatchBookmarks": True,
                "timeoutSeconds": watch_timeout_s,
            }
            async for line in kube.watch(
                path, query, request_timeout_s=watch_timeout_s + 30, accept=watch_accept or accept
            ):
                kind, obj, line_rv, code = codec.decode_line(line)
                if kind == "ERROR":
                    if code == 410:
                        raise _Gone
                    raise KubeError(code or 500, "WATCH", path, line[:300])
                if line_rv:
                    rv = line_rv
                if kind == "BOOKMARK" or obj is None:
                    continue
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    yield Changed(kind, obj)  # type: ignore[arg-type]
            failures = 0  # the server closed the watch at timeoutSeconds: resume from rv
        except _Gone:
            rv, cause = "", "gone"
            log.info("watch history expired, relisting", resource=resource)
        except KubeError as exc:
            if exc.status == 410:
                rv, cause = "", "gone"
                continue
            failures += 1
            log.warning("kube api error", resource=resource, status=exc.status, error=str(exc)[:200])
            await asyncio.sleep(_backoff(failures, max_backoff_s))
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            failures += 1
            log.warning("kube api unreachable", resource=resource, error=type(exc).__name__, attempt=failures)
            await asyncio.sleep(_backoff(failures, max_backoff_s))


def _backoff(failures: int, cap: float) -> float:
    return float(min(cap, 0.2 * 2 ** min(failures, 10)) * (0.5 + random.random() / 2))  # noqa: S311
