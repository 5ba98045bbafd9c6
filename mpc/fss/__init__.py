"""Function secret sharing for two parties: DCF keys from the dealer, comparison/ReLU in 2 rounds.

- :mod:`mpc.fss.dcf` — distributed comparison functions, vectorised key generation and evaluation;
- :mod:`mpc.fss.mmo` — the fixed-key AES batch hash the DCF trees expand seeds with;
- :mod:`mpc.fss.material` — the dealer material ``cmp_fss`` (seed-compressed keys and masks);
- :mod:`mpc.fss.protocol` — :func:`drelu_fss`, shares of [x >= 0], x * [x >= 0] and selections.
"""

from .dcf import DcfKey, key_bytes
from .material import FssCompare
from .protocol import drelu_fss, fss_costs

__all__ = ["DcfKey", "key_bytes", "FssCompare", "drelu_fss", "fss_costs"]
