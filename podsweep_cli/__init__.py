"""The composition root: the `podsweep` command and the services it starts by name. It sits above `services/` and
may import every service; nothing below it (`podsweep/`, `schemas/`, `services/`) imports it."""
