"""The test suite. Imported before any test module, so before torch."""

import os

# Before torch loads OpenMP: its idle threads sleep instead of spinning. On a busy machine spinning threads
# take the CPU from those with work (small tensor ops ran ~10x slower on 2 cores at load 10).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
