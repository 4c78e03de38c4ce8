"""Distributed training under torchrun on this machine: gloo over 127.0.0.1, real processes, real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from cnnlab.run_dir import RunDir
from cnnlab.train.distributed import shard
from tests.conftest import free_port, wait_for_checkpoint

PROBE = Path(__file__).with_name("ddp_probe.py")
CNN = {"model": "tutorial-cnn", "epochs": 3, "seed": 0}
TRAIN = ["--model", "tutorial-cnn", "--dataset", "digits", "--seed", "0", "--no-report", "-q"]
# One thread per process: two processes on two cores. The launcher sets this itself for --nproc > 1.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*command: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


def started(*command: str, env: dict[str, str] = ENV) -> subprocess.Popen[str]:
    """`command` running in the background, its output (stderr folded in) to read with `communicate`."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def cnnlab(*args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "cnnlab", "train", *args)


def probe(out: Path, nproc: int, train: dict) -> list[dict]:
    """Each process's final state and history from a library-level run under torchrun."""
    result = run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(PROBE),
        str(out),
        json.dumps(train),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [torch.load(out / f"rank{rank}.pt") for rank in range(nproc)]


def untimed(rows: list[dict]) -> list[dict]:
    timing = ("seconds", "init_seconds", "val_seconds", "test_seconds", "images_per_s")
    return [{key: value for key, value in row.items() if key not in timing} for row in rows]


def metrics(run_dir: Path) -> list[dict]:
    """The logged metrics per epoch, less the timings."""
    return untimed([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return probe(tmp_path_factory.mktemp("one"), 1, CNN)[0]


@given(st.integers(0, 5000), st.integers(1, 9))
def test_shards_split_a_batch_into_disjoint_contiguous_parts_that_cover_it(count, world_size):
    parts = [shard(count, rank, world_size) for rank in range(world_size)]
    assert [part.start for part in parts[1:]] == [part.stop for part in parts[:-1]]
    assert parts[0].start == 0 and parts[-1].stop == count
    sizes = [part.stop - part.start for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_two_processes_end_identical_and_match_one_process(one_process, tmp_path):
    ranks = probe(tmp_path, 2, CNN)
    assert all(torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]) for key in ranks[0]["state"])
    assert untimed(ranks[0]["history"]) == untimed(ranks[1]["history"])
    two, one = ranks[0]["history"][-1], one_process["history"][-1]
    assert abs(two["test_plain_accuracy"] - one["test_plain_accuracy"]) <= 0.01, (two, one)
    assert one["test_plain_accuracy"] >= 0.9
    # The same steps, summed in another order: the weights agree to float rounding, not only in accuracy.
    for key, value in one_process["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=0.05, atol=0.02)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "checkpoint.pt",
        "config.toml",
        "metrics.jsonl",
        "model.json",
        "model.safetensors",
        "rank0.pt",
        "rank1.pt",
        "sessions.jsonl",
    ]


def test_a_fast_recipe_trains_data_parallel_with_its_whitening_and_batchnorm_in_step(tmp_path):
    # The whitening bias learns for one epoch and then freezes: DDP is rebuilt around the new set. Selection
    # ranks the third epoch's images by losses gathered from both processes.
    train = {"recipe": "fast90", "model": "fast-tiny", "batch_size": 64, "epochs": 3, "whiten_bias_epochs": 1}
    train |= {"select_share": 0.6}
    ranks = probe(tmp_path, 2, train)
    assert all(torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]) for key in ranks[0]["state"])
    assert ranks[0]["history"][-1]["test_delivered_accuracy"] > 0.5


def test_two_nodes_meet_through_a_c10d_rendezvous_and_train_to_the_end(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    rendezvous = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--rdzv-id=cnnlab-two-nodes"]
    training = ["-m", "cnnlab", "train", *TRAIN, "--epochs", "2", "--out", str(out)]
    nodes = [started(*launcher, f"--node-rank={node}", *training) for node in (0, 1)]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert [row["epoch"] for row in metrics(out)] == [1, 2]
    assert (out / "model.safetensors").is_file()
    assert sum("test accuracy" in output for output in outputs) == 1, "only the main process reports"


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resuming_with_another_number_of_processes_continues_the_same_run(tmp_path, first, then):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out, epochs in ((whole, "2"), (split, "1")):
        trained = cnnlab(*TRAIN, "--epochs", epochs, "--out", str(out), "--nproc", str(first))
        assert trained.returncode == 0, trained.stdout + trained.stderr
    resumed = cnnlab("--resume", str(split), "--epochs", "2", "--nproc", str(then), "-q", "--no-report")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (before, after), (expected_before, expected_after) = metrics(split), metrics(whole)
    assert before == expected_before
    assert abs(after["test_plain_accuracy"] - expected_after["test_plain_accuracy"]) <= 0.01
    assert after["train_loss"] == pytest.approx(expected_after["train_loss"], rel=1e-3)


def worker_pids(launcher: int, rank: int) -> list[int]:
    """The training processes of rank `rank` among the descendants of process `launcher`."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue

    def descends(pid: int) -> bool:
        while pid in parents and pid != launcher:
            pid = parents[pid]
        return pid == launcher

    found = []
    for pid in parents:
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != launcher and descends(pid) and f"RANK={rank}".encode() in environment:
            found.append(pid)
    return found


def kill_rank_one_after_first_checkpoint(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cnnlab", "train", *TRAIN, "--nproc", "2", "--out", str(out), *args]
    launcher = started(*command)
    wait_for_checkpoint(out, launcher, timeout=120)
    victims = worker_pids(launcher.pid, 1)
    assert victims, "rank 1 was running"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    output = launcher.communicate(timeout=180)[0]
    return subprocess.CompletedProcess(command, launcher.returncode, output)


def test_a_killed_rank_is_restarted_from_the_last_checkpoint_and_the_run_finishes(one_process, tmp_path):
    out = tmp_path / "run"
    restarts = ["--checkpoint-every", "10", "--max-restarts", "1"]
    result = kill_rank_one_after_first_checkpoint(out, "--epochs", "3", *restarts)
    assert result.returncode == 0, result.stdout
    assert [row["epoch"] for row in metrics(out)] == [1, 2, 3]
    assert abs(metrics(out)[-1]["test_plain_accuracy"] - one_process["history"][-1]["test_plain_accuracy"]) <= 0.01
    assert load_file(str(out / "model.safetensors"))


def test_a_killed_rank_without_restarts_stops_every_process_with_the_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    result = kill_rank_one_after_first_checkpoint(out, "--epochs", "20", "--checkpoint-every", "10")
    assert result.returncode != 0
    assert (
        f"the last checkpoint in {out} is intact; continue with: cnnlab train --resume {out} --nproc 2" in result.stdout
    )
    assert "Traceback" not in result.stdout
    assert RunDir(out).load_checkpoint()["epoch"] >= 0
    assert not list(out.glob(".*.tmp")) and not (out / "model.safetensors").exists()


def test_a_process_whose_peer_dies_says_so_in_one_line(tmp_path):
    # Started by hand, as a cluster's own launcher would: no torchrun agent to end the survivor first.
    port = free_port()
    out = tmp_path / "run"
    world = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    command = [sys.executable, "-m", "cnnlab", "train", *TRAIN, "--epochs", "20", "--checkpoint-every", "10"]
    processes = [
        started(*command, "--out", str(out), env={**ENV, **world, "RANK": str(rank), "LOCAL_RANK": str(rank)})
        for rank in (0, 1)
    ]
    wait_for_checkpoint(out, processes[0], timeout=120)
    processes[1].kill()
    processes[1].communicate(timeout=30)
    output = processes[0].communicate(timeout=120)[0]
    assert processes[0].returncode != 0, output
    assert "error: rank 0: another process of this run stopped (" in output
    assert f"the last checkpoint in {out} is intact; continue with: cnnlab train --resume {out}" in output
    assert "Traceback" not in output
    assert RunDir(out).load_checkpoint()["epoch"] >= 0


def test_ctrl_c_stops_every_process_at_one_step_with_a_checkpoint_to_resume_from(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cnnlab", "train", *TRAIN, "--nproc", "2", "--out", str(out), "--epochs", "20"]
    launcher = started(*command, "--checkpoint-every", "10")
    wait_for_checkpoint(out, launcher, timeout=120)
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C sends; torchrun passes it on to the processes as SIGTERM
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 128 + signal.SIGINT, output
    assert f"continue with: cnnlab train --resume {out} --nproc 2" in output
    assert "Traceback" not in output
    stopped_at = RunDir(out).load_checkpoint()["epoch"]
    resumed = cnnlab("--resume", str(out), "--nproc", "2", "--epochs", str(stopped_at + 2), "-q", "--no-report")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [row["epoch"] for row in metrics(out)] == list(range(1, stopped_at + 3))


def test_sync_bn_on_cpu_is_refused_in_one_line(tmp_path):
    result = cnnlab(*TRAIN, "--epochs", "1", "--out", str(tmp_path / "run"), "--nproc", "2", "--sync-bn")
    assert result.returncode != 0
    assert "--sync-bn needs CUDA" in result.stderr + result.stdout
