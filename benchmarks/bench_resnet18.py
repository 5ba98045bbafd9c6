"""pytest-benchmark case: encrypted ResNet-18 inference, one 3x224x224 image, three processes on 127.0.0.1.

    python -m pytest benchmarks/bench_resnet18.py --benchmark-only

The benchmark times :func:`bridge.infer_local` end to end (process start-up
included); the parties' own wall time, rounds, bytes (online, dealer, set-up)
and plaintext torch's time in the same run go to ``extra_info``.  For the
table, see ``benchmarks/resnet18_table.py``.
"""

import numpy as np
import torch

import bridge

from resnet18_table import plaintext_seconds, resnet18


def test_resnet18_224_encrypted(benchmark):
    model = resnet18()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).double().numpy()
    result = benchmark.pedantic(lambda: bridge.infer_local(model, x), rounds=1, iterations=1)
    stats = {k: v for k, v in result.stats.items() if k != "per_party"}
    plain = plaintext_seconds(model, x)
    benchmark.extra_info.update(stats)
    benchmark.extra_info["plaintext_seconds"] = plain
    benchmark.extra_info["ratio_to_plaintext"] = stats["seconds"] / plain
    error = float(np.abs(result.logits - ref).max())
    benchmark.extra_info["max_logit_error"] = error
    assert error <= 1e-2 * np.abs(ref).max()
    assert (result.logits.argmax(1) == ref.argmax(1)).all()
