"""What the operator commands (`podsweep rescan`, `podsweep status`, `podsweep check`) do on NATS, as the `operator`
user of the deployed NATS: a declaration like a service's, rendered into accounts.conf by `podsweep deploy
nats-accounts` beside theirs and enforced by their Bus.

Least privilege: ask the dispatcher for rescans and hear its answer, read the state the commands show, nothing else
(no event a service publishes, no write to a bucket, no consumer of its own). `podsweep report admissions` is not
covered: it reads admission.decided through an ordered consumer on the events stream itself, which no declared user
may create.
"""

from __future__ import annotations

from podsweep.natsaccess import Bucket, Durable, NatsAccess
from schemas import subjects
from schemas.state import LIMITS_BUCKET, SCANS_BUCKET, WORKLOADS_BUCKET

USER = "operator"
# The connection name of every operator command: its inbox prefix (natsaccess.inbox_prefix) is the user's.
CONNECTION = USER

OPERATOR = NatsAccess(
    service=USER,
    publishes=(subjects.RESCAN_REQUESTED,),  # podsweep rescan
    listens=(subjects.RESCAN_ACCEPTED,),  # the dispatcher's answer to it
    buckets=(
        Bucket(SCANS_BUCKET, writes=False),  # podsweep status
        Bucket(LIMITS_BUCKET, writes=False),  # podsweep status: the dispatcher's lease
        Bucket(WORKLOADS_BUCKET, writes=False),  # podsweep check: who runs a digest
    ),
    # podsweep status: the lag of every service's durable (services/<name>/main.py, by name; a unit test compares).
    inspects=(
        Durable("dispatcher", (), per_cluster=True),
        Durable("parser", ()),
        Durable("notifier", ()),
    ),
    creates=False,  # it uses the stream and the buckets the services made, and never makes one
)
