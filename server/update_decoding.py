"""The coordinator's side of run config ``update-encoding``: a train reply's arrays back to weights.

Runs before the strategy validates a reply, so the checks (keys, shapes, dtypes, finiteness, update norm) and the
aggregation see weights exactly as a float32 reply would carry them (``common.update_encoding``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common import wire
from common.update_encoding import UpdateEncodingError, decode_update


def decode_reply_arrays(content: RecordDict, reference: Mapping[str, np.ndarray], encoding: str) -> str | None:
    """Replace the reply's encoded ``arrays`` with the weights they stand for; why not, or None when done.

    A reply without exactly one ``arrays`` record is left as it is (the strategy's own checks reject it).
    """
    if encoding == "float32" or set(content.array_records) != {wire.ARRAYS}:
        return None
    try:
        encoded = {k: v.numpy() for k, v in content.array_records[wire.ARRAYS].items()}
        decoded = decode_update(encoded, reference, encoding)
    except (UpdateEncodingError, ValueError, TypeError) as error:
        return f"update-encoding {encoding}: {error}"
    content[wire.ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in decoded.items()})
    return None
