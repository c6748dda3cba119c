"""The one Kubernetes API client: kubernetes-asyncio for config and auth, raw bytes in and out.

Responses are never turned into kubernetes-asyncio models (about 190x slower than msgspec); callers decode the bytes
with their own msgspec Structs. Every call is counted, so services can report API calls made.
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from kubernetes_asyncio import client, config
from opentelemetry import metrics

meter = metrics.get_meter("podsweep.kube")
api_calls = meter.create_counter("podsweep_kube_api_calls", description="Kubernetes API calls, by verb and resource")


# Metadata-only reads: the API server sends names, uids and ownerReferences, not whole objects.
METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
# A metadata-only list asks for the list form, a watch for the object form. A watch that asks for
# PartialObjectMetadataList first gets a 200 and then no event at all from kube-apiserver 1.36 (measured): the
# watcher's node watch once did exactly that, so every node that joined later looked deleted.
METADATA_WATCH = f"{METADATA},application/json"


class KubeError(RuntimeError):
    """A non-2xx answer from the API server; `status` is the HTTP code (409 Conflict, 410 Gone, 404, ...)."""

    def __init__(self, status: int, method: str, path: str, body: bytes) -> None:
        self.status = status
        self.body = body
        super().__init__(f"kube: {method} {path} answered {status}: {body[:300].decode(errors='replace')}")


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.calls = 0

    @classmethod
    async def connect(cls, kubeconfig: str | None) -> Kube:
        """From a kubeconfig file, or the in-cluster service account when `kubeconfig` is None."""
        configuration = client.Configuration()
        if kubeconfig is None:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        api = client.ApiClient(configuration)
        _settle_proxy(api)
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    async def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str | int | bool] | None = None,
        body: Mapping[str, Any] | bytes | None = None,
        request_timeout_s: float | None = 60.0,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> bytes:
        """One API call; returns the raw body or raises KubeError. A body already encoded (bytes) is sent as it is."""
        self.calls += 1
        api_calls.add(1, {"verb": method, "resource": _resource(path)})
        if isinstance(body, bytes):
            return await self._send(method, path, params, body, request_timeout_s, content_type, accept)
        response = await self.api.call_api(
            path,
            method,
            query_params=[(k, _param(v)) for k, v in (params or {}).items()],
            header_params={"Accept": accept, "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=request_timeout_s,
        )
        try:
            data: bytes = await response.read()
        finally:
            response.release()
        if not 200 <= response.status <= 299:
            raise KubeError(response.status, method, path, data)
        return data

    async def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, str | int | bool] | None,
        data: bytes,
        request_timeout_s: float | None,
        content_type: str,
        accept: str,
    ) -> bytes:
        """An encoded body straight to the client's session, with the same auth, proxy and TLS name as call_api:
        kubernetes-asyncio would walk the body and json.dumps it, the largest part of a Job POST's CPU."""
        headers: dict[str, str] = {**self.api.default_headers, "Accept": accept, "Content-Type": content_type}
        await self.api.update_params_for_auth(headers, [], ["BearerToken"])
        rest = self.api.rest_client
        options: dict[str, Any] = {
            "headers": headers,
            "data": data,
            "timeout": aiohttp.ClientTimeout(total=request_timeout_s),
        }
        if params:
            options["params"] = [(k, _param(v)) for k, v in params.items()]
        if rest.proxy:
            options["proxy"] = rest.proxy
        if rest.proxy_headers:
            options["proxy_headers"] = rest.proxy_headers
        if rest.server_hostname:
            options["server_hostname"] = rest.server_hostname
        async with rest.pool_manager.request(method, f"{self.api.configuration.host}{path}", **options) as response:
            answer = await response.read()
            if not 200 <= response.status <= 299:
                raise KubeError(response.status, method, path, answer)
            return answer

    async def get(
        self, path: str, params: Mapping[str, str | int | bool] | None = None, accept: str = "application/json"
    ) -> bytes:
        return await self.request("GET", path, params, accept=accept)

    async def watch(
        self,
        path: str,
        params: Mapping[str, str | int | bool],
        request_timeout_s: float,
        accept: str = "application/json",
    ) -> AsyncIterator[bytes]:
        """The lines of a watch (`watch=1` is added); ends when the server closes it or `request_timeout_s` passes."""
        self.calls += 1
        api_calls.add(1, {"verb": "WATCH", "resource": _resource(path)})
        query = [(k, _param(v)) for k, v in params.items()] + [("watch", "1")]
        response = await self.api.call_api(
            path,
            "GET",
            query_params=query,
            header_params={"Accept": accept},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=request_timeout_s,
        )
        try:
            if not 200 <= response.status <= 299:
                raise KubeError(response.status, "WATCH", path, await response.read())
            while True:
                line = await response.content.readline()
                if not line:
                    return
                if line.strip():
                    yield line
        finally:
            response.release()


def _settle_proxy(api: client.ApiClient) -> None:
    """Decide the API server's proxy once, from the environment, instead of on every call.

    kubernetes-asyncio's HTTP session trusts the environment, so aiohttp looked up proxy variables and parsed
    ~/.netrc in a worker thread on every request (two thread hops per API call: about a tenth of the dispatcher's
    CPU). The same variables are read here once (HTTPS_PROXY, NO_PROXY, ...); a netrc login is never used for the
    API server, whose credentials travel in the Authorization header or the TLS client certificate.
    """
    rest = api.rest_client
    proxy: str | None = rest.proxy  # kubeconfig's proxy-url, when it has one
    server = urlsplit(str(api.configuration.host))
    if proxy is None and server.hostname and not urllib.request.proxy_bypass(server.hostname):
        found = urllib.request.getproxies().get(server.scheme)
        if found:
            rest.proxy = found
    session: aiohttp.ClientSession = rest.pool_manager
    rest.pool_manager = aiohttp.ClientSession(
        connector=session.connector, trust_env=False, read_bufsize=2**21
    )  # the same connection pool and TLS context, and the large read buffer watches need
    session.detach()


def _param(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _resource(path: str) -> str:
    """A low-cardinality label for a path: the resource name, never object names."""
    parts = [p for p in path.split("/") if p]
    # /api/v1/namespaces/ns/pods/name, /apis/batch/v1/namespaces/ns/jobs, /api/v1/pods
    for i, part in enumerate(parts):
        if part == "namespaces" and i + 2 < len(parts):
            return parts[i + 2]
    return parts[-1] if parts else ""
