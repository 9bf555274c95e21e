"""Threads fitted to the cores: the quota and affinity read, and a head's training the same at any count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from headstart.config import HeadParams, OptimParams
from headstart.fit import fit
from headstart.heads import make_head
from headstart.threads import available_cores, cgroup_quota, head_threads, threads_for, torch_threads


def test_the_cgroup_quota_caps_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert cgroup_quota(tmp_path) == 1.5 and available_cores(tmp_path) == min(2, available_cores())
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1) == 1.0 and available_cores(v1) == 1
    assert cgroup_quota(tmp_path / "none") is None


def test_a_head_trains_on_the_idle_cores_at_least_one() -> None:
    assert threads_for(2, 0.3) == 1  # another process holds a core: one thread, not two waiting
    assert threads_for(2, 1.8) == 2
    assert threads_for(4, 16.0) == 4  # never more than this process may use
    assert threads_for(2, None) == 2  # nothing to measure with: every available core
    assert 1 <= head_threads() <= available_cores()


@pytest.mark.parametrize("hidden", [[], [32]])
def test_a_head_trained_on_one_or_two_threads_is_bitwise_the_same(hidden: list[int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 1, 14, 14)).astype(np.float32)
    y = rng.integers(0, 4, size=600)
    optim = OptimParams(epochs=3, batch_size=32, lr=1e-2, patience=10)
    weights, histories = [], []
    for threads in (1, 2):
        with torch_threads(threads):
            assert torch.get_num_threads() == threads
            torch.manual_seed(0)
            head = make_head((1, 14, 14), 4, HeadParams(hidden=hidden, dropout=0.2))
            result = fit(head, (x[:500], y[:500]), (x[500:], y[500:]), optim, seed=1)
        weights.append(b"".join(p.detach().numpy().tobytes() for p in head.parameters()))
        histories.append([{k: v for k, v in epoch.items() if k != "seconds"} for epoch in result.history])
    assert weights[0] == weights[1]
    assert histories[0] == histories[1]
