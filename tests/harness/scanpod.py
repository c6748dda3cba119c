"""What a scan pod's upload container does on a real node, for tests whose stand-in does not run the real command:
send a body to each of the Job's upload URLs the way `podsweep upload` does (services/dispatcher/upload.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx

from services.dispatcher import upload
from tests.harness.standin import Pod


def upload_env(pod: Pod) -> dict[str, str]:
    """The pod's environment, every container's, by name (the upload URLs are in the `upload` container's)."""
    return {e.name: e.value for c in pod.spec.containers for e in c.env}


async def send_uploads(pod: Pod, bodies: Mapping[str, bytes]) -> None:
    """POST each body to the upload URL in the pod's environment variable of that name; fail if one is refused."""
    env = upload_env(pod)

    def send() -> list[str]:
        refused = []
        with httpx.Client(timeout=10) as client:
            for variable, body in bodies.items():
                if variable in env:
                    target = upload.UploadTarget(path=variable, url=env[variable])
                    if not upload.put(client, target, body, upload.RetryPolicy(attempts=1)):
                        refused.append(variable)
        return refused

    refused = await asyncio.to_thread(send)
    assert not refused, f"the upload URLs in {refused} refused the scan pod's bodies"


def upload_key(pod: Pod, variable: str) -> str:
    """The object key the upload URL in `variable` writes: a POST policy's `key` field, or a presigned PUT's path."""
    url = upload_env(pod).get(variable, "")
    form = upload.post_form(url)
    if form is not None:
        return next((value for name, value in form[1] if name == "key"), "")
    return urlsplit(url).path.split("/", 2)[-1]  # /<bucket>/<key>
