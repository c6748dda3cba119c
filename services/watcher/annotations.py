"""Options a workload chooses through `podsweep.io/*` pod annotations, and the namespace include/exclude filter.

Pure. Only validated values become options; every other `podsweep.io/` key or value is returned as a rejection for
the shell to log (with a safe preview, never the raw value) and is never passed on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from functools import lru_cache

import msgspec

from schemas import jobs
from schemas.events import ImageOptions
from schemas.refs import DNS_LABEL_PATTERN

PREFIX = "podsweep.io/"
IGNORE_UNFIXED = "podsweep.io/ignore-unfixed"
NOTIFY = "podsweep.io/notify"
# Keys podsweep itself puts on its scan Jobs and their pods: not options, never rejected.
_OWN_KEYS = frozenset({jobs.SCAN_ID_LABEL, jobs.BATCH_ANNOTATION, *jobs.JOB_ANNOTATIONS})

_ROUTE_RE = re.compile(DNS_LABEL_PATTERN)
_MAX_ROUTE = 63
_PREVIEW = 40
_CACHEABLE = 256


class Rejection(msgspec.Struct, frozen=True, gc=False):
    """An annotation podsweep ignored: `key` and `preview` are escaped and truncated, safe for one log line."""

    key: str
    reason: str
    preview: str = ""


def _safe(text: str, limit: int = _PREVIEW) -> str:
    # ascii() escapes control characters, newlines and every non-ASCII character: one log line, no terminal tricks.
    shown = ascii(text[:limit])[1:-1]
    return shown + ("..." if len(text) > limit else "")


def options_from(annotations: Mapping[str, str]) -> tuple[ImageOptions, tuple[Rejection, ...]]:
    """ImageOptions from a pod's annotations, and what was refused. Annotations outside podsweep.io/ are not ours."""
    if not any(key.startswith(PREFIX) for key in annotations):
        return DEFAULT_OPTIONS, ()
    items = tuple(sorted((k, v) for k, v in annotations.items() if k.startswith(PREFIX)))
    if any(len(k) + len(v) > _CACHEABLE for k, v in items):
        return _options.__wrapped__(items)  # never cache hostile megabytes: annotations may hold 256 KiB
    return _options(items)


DEFAULT_OPTIONS = ImageOptions()


@lru_cache(maxsize=4096)
def _options(items: tuple[tuple[str, str], ...]) -> tuple[ImageOptions, tuple[Rejection, ...]]:
    # Cached on the podsweep.io/ items only: replicas share them, and equal options become one shared instance.
    ignore_unfixed = False
    notify: str | None = None
    rejections: list[Rejection] = []
    for key, value in items:
        if key == IGNORE_UNFIXED:
            if value in ("true", "false"):
                ignore_unfixed = value == "true"
            else:
                rejections.append(Rejection(_safe(key), 'expected "true" or "false"', _safe(value)))
        elif key == NOTIFY:
            if len(value) > _MAX_ROUTE:
                rejections.append(Rejection(_safe(key), f"route is {len(value)} characters (at most 63)", _safe(value)))
            elif _ROUTE_RE.match(value) is None:
                rejections.append(Rejection(_safe(key), "route must be a DNS label (a-z, 0-9, '-')", _safe(value)))
            else:
                notify = value
        elif key not in _OWN_KEYS:
            rejections.append(Rejection(_safe(key, 80), "unknown podsweep.io annotation"))
    options = ImageOptions(ignore_unfixed=ignore_unfixed, notify=notify)
    return (DEFAULT_OPTIONS if options == DEFAULT_OPTIONS else options), tuple(rejections)


class NamespaceFilter(msgspec.Struct, frozen=True):
    """Shell-style globs (`team-*`, `kube-?ystem`); a namespace is watched when it matches an include and no exclude.

    An empty include list means every namespace.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def literal_namespaces(self) -> tuple[str, ...] | None:
        """The namespaces to watch one by one when every include is a plain name; None means watch all of them."""
        if not self.include or any(ch in pattern for pattern in self.include for ch in "*?["):
            return None
        return tuple(ns for ns in self.include if self.selects(ns))

    def selects(self, namespace: str) -> bool:
        """True when pods in `namespace` are watched."""
        return _selects(namespace, self.include, self.exclude)


@lru_cache(maxsize=8192)
def _selects(namespace: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatchcase(namespace, pattern) for pattern in include):
        return False
    return not any(fnmatchcase(namespace, pattern) for pattern in exclude)


def is_own_scan_pod(namespace: str, annotations: Mapping[str, str], scan_namespace: str) -> bool:
    """True for podsweep's own scan pods: in its scan namespace and carrying the scan Job's mode annotation.

    A node scan runs inside the image it scans, so without this the watcher would report every scanned image as
    also run by a scan Job (and alerts would name that Job). Only the scan namespace counts, so an annotation on a
    pod anywhere else never hides that pod."""
    return namespace == scan_namespace and jobs.MODE_ANNOTATION in annotations


def filter_from(include: Sequence[str], exclude: Sequence[str]) -> NamespaceFilter:
    """A filter from configuration; raises ValueError naming a pattern that can never match a namespace."""
    for pattern in (*include, *exclude):
        if not pattern or len(pattern) > 253 or re.fullmatch(r"[a-z0-9*?\[\]!-]+", pattern) is None:
            raise ValueError(
                f"namespace filter: {_safe(pattern)!r} is not a glob over namespace names (a-z, 0-9, '-', * ? [ ])"
            )
    return NamespaceFilter(tuple(include), tuple(exclude))
