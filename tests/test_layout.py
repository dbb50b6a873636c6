"""House rules that code review forgets: the direction of imports."""

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    return {m.split(".")[0] for m in result.stdout.split()}


def test_core_imports_neither_flax_nor_experiments():
    loaded = _modules_after("import jattn, jattn.mixers")
    assert "flax" not in loaded and "experiments" not in loaded


def test_pallas_kernels_import_jax_only():
    loaded = _modules_after("import pallas_kernels")
    assert "jattn" not in loaded and "flax" not in loaded
