"""Data parallelism is exact: 2 processes under torchrun (gloo) update like 1 process on the same batches."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def _load(out: Path) -> dict:
    return {path.stem: torch.load(path, weights_only=True) for path in sorted(out.glob("rank*.pt"))}


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(ddp)]
    launched = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the single-process reference runs here meanwhile (no torchrun environment: world size 1)
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(WORKER), run_name="worker")["main"](single_dir)
    finally:
        torch.set_num_threads(threads)
    output, _ = launched.communicate(timeout=240)
    assert launched.returncode == 0, output

    single, ranks = _load(single_dir)["rank0"], _load(ddp)
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks.values()] == [2, 2]
    two = ranks["rank0"]["models"]
    for name in ("dot", "kd", "fit"):  # 6 steps each, the last batch of every epoch split unevenly
        for key, value in single["models"][name].items():
            torch.testing.assert_close(two[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
    assert torch.all(two["dot"]["1.weight"][~ranks["rank0"]["keep"]] == 0)
    # the processes hold one model: parameters by identical reductions, BatchNorm statistics by averaging
    for name, state in ranks["rank1"]["models"].items():
        for key, value in state.items():
            assert torch.equal(value, two[name][key]), f"{name} {key}"
