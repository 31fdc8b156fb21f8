"""Loading the CPU kernels leaves the process's floating point alone."""

import json
import subprocess
import sys


def test_loading_the_kernels_keeps_denormals():
    """gcc's -ffast-math links crtfastmath.o, which sets flush-to-zero for the whole process:
    then Python itself read 5e-324 as 0.0 (a JSON request's value silently changed)."""
    code = ("import json; from qwenkit.kernels import cpu; "
            "assert cpu.library() is not None, 'no kernels built'; print(json.loads('5e-324'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == json.loads("5e-324") > 0
