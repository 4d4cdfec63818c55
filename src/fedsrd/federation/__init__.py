"""What every runtime does in a round, written once.

=====================  ==========================================================================================
`sampling`             which clients train in a round (seeded by run seed, round, retry)
`client_phase`         one client's phase: global + personal state in, local training, encoded update out
`loop`                 `Federation`: the round loop, retries, evaluation/saving policy; a runtime is a `Transport`
`history`              the one ``history.json`` record schema (`HISTORY_KEYS`, per-client MB), the round table
`callbacks`            `FederatedCallback` and `RoundEvents` (what fires when; ``control`` honoured)
`evaluation`           held-out scores of the global model
`files`                atomic writes
=====================  ==========================================================================================

Runtimes (`fedsrd.runtime.local`, `fedsrd.runtime.distributed`, `fedsrd.integrations.flower`) import this package;
it never imports them.
"""

from fedsrd.federation.callbacks import FederatedCallback, RoundEvents
from fedsrd.federation.history import HISTORY_KEYS, MB, SCHEMA_VERSION, RoundTable, round_record, start_record
from fedsrd.federation.loop import Delivery, Federation, Transport
from fedsrd.federation.sampling import sample_clients

__all__ = [
    "HISTORY_KEYS",
    "MB",
    "SCHEMA_VERSION",
    "Delivery",
    "FederatedCallback",
    "Federation",
    "RoundEvents",
    "RoundTable",
    "Transport",
    "round_record",
    "sample_clients",
    "start_record",
]
