"""Seeds derived from seeds: independent random streams for independent purposes, reproducible from one run seed."""
from __future__ import annotations

import numpy as np


def derived_seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (numpy SeedSequence), e.g. derived_seed(seed, round, purpose)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])
