"""pytest setup shared by the doctests (jattn/) and the test suite (tests/).

The suite's shapes are small, so most of its time goes to XLA compiling a few thousand
distinct programs. A compilation cache shared by the workers and subprocesses of one session
holds every program however fast it compiled, so programs compiled again (the trainer's
restarted runs, the same shapes in several test files) load instead of compiling. It is set
here, before any backend starts, so that it also reaches the subprocesses and notebook
kernels the tests launch; it lives in a temporary directory removed at the end of the
session, and a JAX_COMPILATION_CACHE_DIR already set is used as is.

The suite also compiles at LLVM optimisation level 0 (``--xla_backend_optimization_level=0``
added to XLA_FLAGS), which takes about a third off its time: the programs are tiny, so
LLVM's optimisation passes cost more than they save. The level changes roundings, not
semantics; every test compares against a reference within a tolerance. It once exposed a
real fragility (a softmax whose gradient flowed through max(), see
jattn.core.attention.masked_softmax), which the default level happened to hide.

And it turns off XLA:CPU's MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``):
the older emitters compile the suite's fusions in half the time (backend compilation of
tests/efficient/test_bilevel.py, tests/mixers/test_rwkv.py and tests/nn/test_transformer.py:
129 s with them, 65 s without; the three files 197 s -> 133 s on one core). XLA aborts on a
flag it does not know, so the flag is passed only when the installed jaxlib has it.
"""

import importlib.util
import mmap
import os
import shutil
import tempfile
from pathlib import Path

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the session's
    _OWN_CACHE = tempfile.mkdtemp(prefix="jattn-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def _jaxlib_knows(flag: str) -> bool:
    """Whether the installed jaxlib's XLA has the flag ``flag`` (its name is in the library)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    for path in Path(spec.submodule_search_locations[0]).rglob("*.so"):
        if path.stat().st_size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(flag.encode()) >= 0:
                return True
    return False


_FAST_COMPILE = ["--xla_backend_optimization_level=0"]
if _jaxlib_knows("xla_cpu_use_fusion_emitters"):
    _FAST_COMPILE.append("--xla_cpu_use_fusion_emitters=false")
for _flag in _FAST_COMPILE:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
