"""pallas_kernels.flash.autotune: choice, cache, failures (fake run and clock), candidates, and
one real tuning of the GPU kernel in interpret mode."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash import autotune as at
from pallas_kernels.flash.common import BlockSizes
from tests.conftest import normal

A, B, C = BlockSizes(16, 16), BlockSizes(32, 16), BlockSizes(32, 32, num_warps=4)


@pytest.fixture(autouse=True)
def empty_cache():
    at.clear_cache()
    yield
    at.clear_cache()


class FakeKernel:
    """``run`` whose calls advance a fake clock by a per-candidate cost (or raise)."""

    def __init__(self, costs: dict[BlockSizes, float | Exception]):
        self.costs = costs
        self.now = 0.0
        self.calls: list[BlockSizes] = []

    def run(self, blocks: BlockSizes):
        self.calls.append(blocks)
        cost = self.costs[blocks]
        if isinstance(cost, Exception):
            raise cost
        self.now += cost
        return np.zeros(())

    def timer(self) -> float:
        return self.now


def test_picks_the_fastest_and_times_after_warm_up():
    fake = FakeKernel({A: 3.0, B: 1.0, C: 2.0})
    assert at.autotune(fake.run, [A, B, C], key="k", warmup=2, iters=3,
                       timer=fake.timer) == B
    assert fake.calls == [A] * 5 + [B] * 5 + [C] * 5
    assert [(t.block_sizes, t.seconds) for t in at.trials("k")] == [(A, 3.0), (B, 1.0),
                                                                    (C, 2.0)]


def test_median_not_mean_and_ties_go_to_the_first():
    costs = iter([1.0, 100.0, 1.0, 2.0, 2.0, 2.0])  # A: median 1 despite one slow call

    class Spiky(FakeKernel):
        def run(self, blocks):
            self.now += next(costs)

    fake = Spiky({})
    assert at.autotune(fake.run, [A, B], key="spiky", warmup=0, iters=3,
                       timer=fake.timer) == A
    fake = FakeKernel({A: 1.0, B: 1.0})
    assert at.autotune(fake.run, [B, A], key="tie", warmup=0, timer=fake.timer) == B


def test_caches_per_key_and_device():
    fake = FakeKernel({A: 2.0, B: 1.0})
    assert at.autotune(fake.run, [A, B], key=("T", 64), timer=fake.timer) == B
    calls = len(fake.calls)
    fake.costs = {A: 0.5, B: 1.0}  # would change the choice if it were run again
    assert at.autotune(fake.run, [A, B], key=("T", 64), timer=fake.timer) == B
    assert len(fake.calls) == calls
    assert at.autotune(fake.run, [A, B], key=("T", 128), timer=fake.timer) == A
    assert len(fake.calls) > calls
    assert ((at.device_kind(), ("T", 64)) in at._CACHE)


def test_skips_failing_candidates_and_records_why():
    fake = FakeKernel({A: RuntimeError("out of shared memory: 300000 > 232448\nmore"),
                       B: 2.0, C: ValueError("block_q too big")})
    assert at.autotune(fake.run, [A, B, C], key="skip", timer=fake.timer) == B
    errors = {t.block_sizes: t.error for t in at.trials("skip")}
    assert errors[A] == "RuntimeError: out of shared memory: 300000 > 232448"
    assert errors[C] == "ValueError: block_q too big"
    assert errors[B] is None


def test_all_failing_raises_a_clear_error_and_caches_nothing():
    fake = FakeKernel({A: RuntimeError("no smem"), B: ValueError("bad tile")})
    with pytest.raises(RuntimeError, match=r"every candidate failed.*no smem.*bad tile"):
        at.autotune(fake.run, [A, B], key="fail", timer=fake.timer)
    assert not any(k[1] == "fail" for k in at._CACHE)


@pytest.mark.parametrize("kwargs, match", [
    (dict(candidates=[]), "candidates"),
    (dict(candidates=[(16, 16)]), "candidates"),
    (dict(candidates=[A], warmup=-1), "warmup"),
    (dict(candidates=[A], iters=0), "iters"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        at.autotune(FakeKernel({A: 1.0}).run, key="bad", **kwargs)


def test_candidates_for():
    gpu = at.candidates_for("gpu", 8192, 8192, 128, jnp.bfloat16)
    assert gpu[0] == BlockSizes(128, 64) and 3 <= len(gpu) == len(set(gpu))
    for blocks in gpu + at.candidates_for("gpu", 8192, 8192, 256, jnp.float32):
        assert blocks.block_q >= 16 and blocks.block_q & (blocks.block_q - 1) == 0
    # H > 128: tiles of at most 64 x 64 elements (shared memory)
    assert all(b.block_q * b.block_kv <= 64 * 64
               for b in at.candidates_for("gpu", 4096, 4096, 256, jnp.bfloat16))
    short = at.candidates_for("gpu", 20, 5, 64, jnp.float32)  # capped at the lengths
    assert all(b.block_q <= 32 and b.block_kv == 16 for b in short)
    tpu = at.candidates_for("tpu", 4096, 4096, 128, jnp.bfloat16)
    assert tpu[0] == BlockSizes(512, 512)
    assert all(b.block_q % 128 == 0 and b.block_kv % 128 == 0 for b in tpu)
    with pytest.raises(ValueError, match="backend"):
        at.candidates_for("cpu", 64, 64, 32)
    with pytest.raises(ValueError, match="T"):
        at.candidates_for("gpu", 0, 64, 32)


def test_real_tiny_tuning_in_interpret_mode():
    q = normal(0, (1, 40, 2, 16))
    candidates = [BlockSizes(16, 16), BlockSizes(32, 16), BlockSizes(16, 32)]
    chosen = at.tune_flash_attention(q, q, q, backend="gpu", hi=0, interpret=True,
                                     candidates=candidates, iters=1)
    assert chosen in candidates
    (outcomes,) = at._TRIALS.values()
    assert [t.block_sizes for t in outcomes] == candidates
    assert all(t.seconds is not None and t.seconds > 0 for t in outcomes)
    # the same call again is answered from the cache
    assert at.tune_flash_attention(q, q, q, backend="gpu", hi=0, interpret=True,
                                   candidates=[BlockSizes(64, 64)], iters=1) == chosen
    with pytest.raises(ValueError, match="block_map"):
        at.tune_flash_attention(q, q, q, backend="gpu", block_map=None, interpret=True)
