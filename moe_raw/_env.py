"""moe_raw's environment switches, read once at import (the README's "Environment variables" lists them).

* ``MOE_RAW_DEBUG=1``: also check input *values* (routing-map entries, index ranges, chunk sizes); each check reads
  the device, a host sync (``moe_raw._validate.DEBUG``; tests set that attribute directly).
* ``MOE_RAW_NO_BULK_COPY=1``: permute writes 16-byte rows with plain stores instead of the sm_90 bulk-copy engine,
  whose writes compute-sanitizer's initcheck does not see (a few % slower).
* ``MOE_RAW_BLOCK_KERNELS=1``: the gather (unpermute forward, permute backward) and permute_quantized run their
  block-a-token kernels instead of the default warp-a-token ones (the same results; for comparing the two and for
  isolating a fault).
"""

from __future__ import annotations

import os


def _on(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


DEBUG = _on("MOE_RAW_DEBUG")
NO_BULK_COPY = _on("MOE_RAW_NO_BULK_COPY")
BLOCK_KERNELS = _on("MOE_RAW_BLOCK_KERNELS")
