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
jattn.attention.masked_softmax), which the default level happened to hide.
"""

import os
import shutil
import tempfile

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the session's
    _OWN_CACHE = tempfile.mkdtemp(prefix="jattn-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
