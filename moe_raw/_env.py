"""moe_raw's environment switches, read once at import (the README's "Environment variables" lists them).

* ``MOE_RAW_DEBUG=1``: also check input *values* (routing-map entries, index ranges, chunk sizes); each check reads
  the device, a host sync (``moe_raw._validate.DEBUG``; tests set that attribute directly).
* ``MOE_RAW_NO_BULK_COPY=1``: permute writes 16-byte rows with plain stores instead of the sm_90 bulk-copy engine,
  whose writes compute-sanitizer's initcheck does not see (a few % slower).
* ``MOE_RAW_BLOCK_KERNELS``: which row kernels the gather (unpermute forward, permute backward) and permute_quantized
  run, for comparing them and isolating a fault (the same results either way): ``1`` the block-a-token ones, ``0``
  the warp-a-token ones, unset each op's default (the gather: a block a token; permute_quantized: a warp a token).
"""

from __future__ import annotations

import os


def _on(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


DEBUG = _on("MOE_RAW_DEBUG")
NO_BULK_COPY = _on("MOE_RAW_NO_BULK_COPY")
# True / False where set (_on: 1 / 0), None where unset or empty: each op keeps its default kernel.
BLOCK_KERNELS = _on("MOE_RAW_BLOCK_KERNELS") if os.environ.get("MOE_RAW_BLOCK_KERNELS") else None
