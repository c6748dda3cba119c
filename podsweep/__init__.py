"""podsweep: the runtime the services share (CLI, configuration, NATS, S3, telemetry, logs)."""

__version__ = "0.1.0"
