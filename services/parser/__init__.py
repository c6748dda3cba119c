"""The parser: reads Trivy reports from any version, normalizes and stores them. Never touches Kubernetes."""
