"""pytest setup shared by the doctests (jattn/) and the test suite (tests/).

The suite's shapes are small, so most of its time goes to XLA compiling a few thousand
distinct programs. A compilation cache shared by the workers and subprocesses of one session
holds every program however fast it compiled, so programs compiled again (the trainer's
restarted runs, the same shapes in several test files) load instead of compiling. It is set
here, before any backend starts, so that it also reaches the subprocesses and notebook
kernels the tests launch; it lives in a temporary directory removed at the end of the
session, and a JAX_COMPILATION_CACHE_DIR already set is used as is.

Not used: LLVM optimisation level 0 (``--xla_backend_optimization_level=0``) takes about 38%
off the suite, but two float64 reference gradients (tests/test_agent.py, tests/test_rwkv.py)
come out inf/NaN under it and finite at the default level; not understood yet.
"""

import os
import shutil
import tempfile

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the session's
    _OWN_CACHE = tempfile.mkdtemp(prefix="jattn-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
