"""The notifier: turns `podsweep.report.stored` into alerts for the owners of the workloads that run the image.

Pure modules decide (`decide`, `messages`, `signing`, `retry`, `check`); the shell only consumes, fetches and sends.
It never touches Kubernetes.
"""
