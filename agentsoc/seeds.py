"""Seeds derived from names, so every random choice of a run is reproducible and independent.

``hash()`` is salted per process, so it cannot be used: a resumed run must derive the same seed
for the same (run, phase, problem, agent, round) as the run it continues.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


def seeded_rng(*parts: object) -> random.Random:
    """A private random generator seeded from ``parts`` (never the global one)."""
    return random.Random(derive_seed(*parts))
