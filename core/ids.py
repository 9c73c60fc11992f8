"""Opaque, time-ordered identifiers.

Ids sort by creation time (48-bit millisecond prefix, like ULID), so keyset pagination on
`(created_at, id)` and B-tree inserts stay local. Clients must treat them as opaque.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def new_id() -> str:
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        value, index = divmod(value, 32)
        chars.append(_ALPHABET[index])
    return "".join(reversed(chars))
