"""jattn.parallel: ring and all-to-all context parallelism. The multi-device cases run in a
subprocess with 8 simulated CPU devices (tests/parallel/multi_device_checks.py); the
single-device and validation cases here."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jattn.parallel import context_parallel_attention, ring_work, zigzag_order
from tests.conftest import REPO, normal


@pytest.mark.slow
def test_on_eight_simulated_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-m", "tests.parallel.multi_device_checks"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 13, result.stdout


def test_zigzag_balances_causal_work():
    for devices in (2, 4, 8):
        work = ring_work(devices)
        assert (work == work[0]).all()
        natural = ring_work(devices, load_balance=False)
        # The same total: every (earlier, later) chunk pair once, cut finer by zig-zag.
        assert natural[:, 0].tolist() == list(range(devices))
        assert work.sum(0).tolist() == [2 * devices * (2 * devices - 1) // 2, 2 * devices]
    order = zigzag_order(24, 3)
    assert sorted(order.tolist()) == list(range(24))


def test_validation():
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("seq",))
    q = normal(0, (1, 6, 2, 4))
    with pytest.raises(ValueError, match="axis_name"):
        context_parallel_attention(q, q, q, mesh=mesh, axis_name="sequence")
    with pytest.raises(ValueError, match="multiple of 2"):
        context_parallel_attention(normal(0, (1, 5, 2, 4)), normal(0, (1, 5, 2, 4)),
                                   normal(0, (1, 5, 2, 4)), mesh=mesh, strategy="ring",
                                   is_causal=True)
    with pytest.raises(ValueError, match="all_to_all"):
        context_parallel_attention(q, q, q, mesh=mesh, strategy="ring",
                                   local_window_size=2)
    with pytest.raises(ValueError, match="T == S"):
        context_parallel_attention(q, normal(1, (1, 4, 2, 4)), normal(1, (1, 4, 2, 4)),
                                   mesh=mesh, is_causal=True)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        context_parallel_attention(q, q, q, mesh=mesh, query_segment_ids=np.zeros((1, 6), int),
                                   kv_segment_ids=np.zeros((1, 5), int))
    with pytest.raises(ValueError, match="strategy"):
        context_parallel_attention(q, q, q, mesh=mesh, strategy="tree")
