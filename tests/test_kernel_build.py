"""Loading the CPU kernels leaves the process's floating point alone."""

import json
import re
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


def test_a_source_that_uses_infinities_is_compiled_without_finite_math():
    """-ffinite-math-only lets gcc fold a test against -INFINITY away: a source that names an
    infinity (attention.c's softmax maximum starts there) must not get it."""
    from qwenkit.kernels import build

    uses = [s for s in build.sources() if re.search(r"\bINFINITY\b|\bisinf\b|\bHUGE_VALF?\b", s.read_text())]
    assert [s.name for s in uses] == ["attention.c"]
    flags = [*build.FLAGS, *build.ISA_FLAGS["avx2"]]
    for source in uses:
        assert "-ffinite-math-only" not in build.source_flags(source, flags)
    assert "-ffinite-math-only" in build.source_flags(build.CSRC / "quant.c", flags)


def test_compiling_says_so_in_one_line_and_a_built_library_says_nothing(tmp_path, monkeypatch, capsys):
    from qwenkit.kernels import build

    compiled = []

    def fake_compile(cc, flags, csrc, target):
        compiled.append(target)
        target.write_bytes(b"")

    monkeypatch.setattr(build, "_compile", fake_compile)
    first = build.build("generic", tmp_path, progress=True)
    err = capsys.readouterr().err
    assert re.fullmatch(r"qwenkit: compiling the CPU kernels \(generic, once\) \.\.\. done in \d+ s\n", err), err
    assert build.build("generic", tmp_path, progress=True) == first
    assert capsys.readouterr().err == "" and compiled == [first]
