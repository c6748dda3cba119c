"""The services by name: `services.<name>.main`, with `async def main(settings, stop)` and its `NATS` declaration.

The one place that looks a service up by its name; `podsweep.runtime` runs what it is given.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import cast

from podsweep.natsaccess import NatsAccess
from podsweep.runtime import ServiceMain

# In pipeline order; `up` starts the ones that exist.
SERVICES = ("watcher", "dispatcher", "parser", "notifier", "admission")
# Not started by `podsweep up`: the admission gate needs a TLS pair and an apiserver configured to call it.
NOT_IN_UP = ("admission",)


def available() -> list[str]:
    return [name for name in SERVICES if _exists(f"services.{name}.main")]


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def load(name: str) -> ServiceMain:
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r}: choose one of {', '.join(SERVICES)}")
    if name not in available():
        raise ValueError(
            f"service {name!r} is not part of this podsweep build yet (available: {', '.join(available())})"
        )
    module = importlib.import_module(f"services.{name}.main")
    return cast(ServiceMain, module.main)


def mains(names: list[str]) -> dict[str, ServiceMain]:
    """The named services' mains, for `podsweep.runtime.run`; ValueError naming the first unknown one."""
    return {name: load(name) for name in names}


def nats_access(name: str) -> NatsAccess:
    """What service `name` does on NATS: the `NATS` its main module declares and runs under."""
    load(name)
    access = importlib.import_module(f"services.{name}.main").NATS
    if not isinstance(access, NatsAccess) or access.service != name:
        raise TypeError(f"services/{name}/main.py: NATS must be a NatsAccess for service {name!r}")
    return access
