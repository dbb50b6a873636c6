"""The package as a user installs it: an sdist and a wheel that twine accepts, and the wheel
installed into a fresh virtual environment (no editable install, the repository not on the
path) that imports, reports its version, computes attention and runs an experiment's CLI.

The fresh environment takes the wheel's dependencies (jax, flax, ...) from this one's
site-packages through a .pth line instead of installing them from the registry (minutes per
run). A path added by a .pth line is not scanned for .pth files itself, so this
environment's editable install of jattn is not seen there: the wheel is what imports.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

CHECK = """
import sys
from pathlib import Path

import jax
import jattn

repo, venv, version = sys.argv[1:]
assert Path(jattn.__file__).is_relative_to(venv), jattn.__file__
assert not any(Path(p or ".").resolve() == Path(repo) for p in sys.path), sys.path
assert jattn.__version__ == version, (jattn.__version__, version)
q = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
out = jattn.dot_product_attention(q, q, q, is_causal=True)
assert out.shape == (1, 8, 2, 4)
print("ok", jattn.__version__)
"""


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=300, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_environment_and_runs(tmp_path):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    dist = tmp_path / "dist"
    # --no-isolation: the build backend (setuptools) comes from the test extras, not the
    # network.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, REPO])
    files = sorted(dist.iterdir())
    assert [f.name for f in files] == [f"jattn-{version}-py3-none-any.whl",
                                       f"jattn-{version}.tar.gz"]
    _run([sys.executable, "-m", "twine", "check", "--strict", *files])

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          files[0]])
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    deps = Path(purelib.stdout.strip()) / "dependencies.pth"
    deps.write_text(sysconfig.get_path("purelib") + "\n")

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    out = _run([python, "-c", CHECK, REPO, venv, version], cwd=tmp_path, env=env)
    assert out.stdout.strip() == f"ok {version}"
    cli = _run([python, "-m", "experiments.zoology", "--help"], cwd=tmp_path, env=env)
    assert "usage" in cli.stdout
