import os

# Thread pools fight on 2 cores (see docs/performance): keep OpenMP/OpenBLAS from spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

PARTY_COUNTS = (2, 3, 5)


@pytest.fixture
def rng() -> np.random.Generator:
    # Test data only; secret material never comes from numpy.
    return np.random.default_rng(20261126)


def ulp(frac_bits: int = 16) -> float:
    return 2.0**-frac_bits
