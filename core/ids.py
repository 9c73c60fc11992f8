"""Opaque, time-ordered identifiers.

Ids sort by creation time (48-bit millisecond prefix, like ULID), so keyset pagination on
`(created_at, id)` and B-tree inserts stay local. Clients must treat them as opaque.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


# Two characters (ten bits) per step: a cron round or a fan-out makes thousands at once.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def new_id() -> str:
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(120, -1, -10)])
