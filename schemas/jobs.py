"""Labels and annotations on podsweep's scan Jobs: how the watcher and the parser find digest and scan id.

Values placed under these names are derived from validated digests and scan ids, never from user text.
"""

from __future__ import annotations

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "podsweep"
SCAN_ID_LABEL = "podsweep.io/scan-id"

DIGEST_REF_ANNOTATION = "podsweep.io/digest-ref"
RAW_KEY_ANNOTATION = "podsweep.io/raw-key"
SBOM_KEY_ANNOTATION = "podsweep.io/sbom-key"
MODE_ANNOTATION = "podsweep.io/mode"
NODE_ANNOTATION = "podsweep.io/node"

# The W3C traceparent of the dispatcher's span that created the Job, so the watcher's scan.* events continue the
# trace of the image.seen that caused the scan. Read only in its exact form (podsweep.telemetry.from_traceparent).
TRACEPARENT_ANNOTATION = "podsweep.io/traceparent"

JOB_ANNOTATIONS = (DIGEST_REF_ANNOTATION, RAW_KEY_ANNOTATION, SBOM_KEY_ANNOTATION, MODE_ANNOTATION, NODE_ANNOTATION)
# SBOM rescan Jobs (mode "sbom") hold a batch: a JSON list of {scan_id, digest_ref, raw_key} objects.
BATCH_ANNOTATION = "podsweep.io/batch"
