"""The entry point of a party process started by :func:`mpc.net.run_processes`.

``python -m mpc.net.spawned READ_FD WRITE_FD``: a fresh interpreter whose main
module is this one, not the caller's script (see :mod:`mpc.net.processes`).
"""

import sys

if __name__ == "__main__":
    from mpc.net.processes import child_entry

    child_entry(int(sys.argv[1]), int(sys.argv[2]))
