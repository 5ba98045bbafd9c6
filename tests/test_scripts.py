"""Plain user scripts, run as a user runs them (``python script.py`` from their own folder).

A script that calls :func:`bridge.infer_local` needs no ``if __name__ ==
"__main__":`` guard: the party processes never import it.  A script whose own
function is the party program must have the guard, and without it gets the
fix in one line instead of a dead party.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _run(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    script = tmp_path / "my_script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _tiny() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()


def test_a_script_without_main_guard_runs_infer_local(tmp_path):
    torch.save(_tiny().state_dict(), tmp_path / "tiny.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(2, 1, 6, 6)))
    result = _run(tmp_path, """
        import json
        import numpy as np
        import torch
        from torch import nn
        import bridge

        print("script body runs")  # once: the party processes do not import this file
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
        model.load_state_dict(torch.load("tiny.pt", weights_only=True))
        out = bridge.infer_local(model, np.load("x.npy"))
        print(json.dumps(out.logits.tolist()))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines.count("script body runs") == 1
    logits = np.array(json.loads(lines[-1]))
    with torch.no_grad():
        want = _tiny()(torch.from_numpy(np.load(tmp_path / "x.npy")).float()).double().numpy()
    assert np.abs(logits - want).max() <= 1e-2 * np.abs(want).max()


_OWN_PROGRAM = """
    import numpy as np
    import mpc

    def double_sum(ctx, values):
        x = ctx.share(np.asarray(values) if ctx.rank == 0 else None, owner=0)
        return (x + x).reveal()

    {call}
"""


def test_a_script_whose_own_program_runs_without_main_guard_gets_the_fix_in_one_line(tmp_path):
    result = _run(tmp_path, _OWN_PROGRAM.format(call="print(mpc.run_processes(double_sum, args=([1.5, -2.0],)))"))
    assert result.returncode != 0
    fix = [line for line in result.stderr.splitlines() if "if __name__ ==" in line]
    assert fix, result.stderr[-3000:]
    assert "my_script.py calls run_processes again when a party process imports it" in fix[0]
    assert "peer dealer failed" not in result.stderr and "without reporting a result" not in result.stderr


def test_a_script_whose_own_program_runs_under_the_main_guard(tmp_path):
    call = 'if __name__ == "__main__":\n        print(mpc.run_processes(double_sum, args=([1.5, -2.0],))[0].tolist())'
    result = _run(tmp_path, _OWN_PROGRAM.format(call=call))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [3.0, -4.0]
