"""The kill campaign (tests/faults/kill_campaign.py): a 2-process torchrun training killed the hard way four
times, restarted at once each time, ends bit for bit where an uninterrupted 2-process run ends."""

from __future__ import annotations

import sys

import pytest

from segkit.runs.checkpoint import load_checkpoint

from .kill_campaign import GONE_WITHIN_S, Kill, differing_weights, run_campaign, uninterrupted

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks in /proc")

# 20 optimizer steps: headroom for the random kills, which come after a new checkpoint of their launch and
# may each let a fast machine train a few epochs more; the marked kills come after a checkpoint exists.
EPOCHS = 10
KILLS = [
    Kill("launcher", "random", delay_s=0.5),  # SIGKILL to torchrun's process group
    Kill("launcher", "validation", delay_s=0.3, intrude=True),  # a partial confusion matrix on each rank
    Kill("launcher", "checkpoint_write", delay_s=0.3),  # between last.pt -> last.prev.pt and tmp -> last.pt
    Kill("rank1", "random", delay_s=0.2),  # torchrun alive: it ends the other rank
]


@pytest.mark.slow
def test_killed_and_restarted_at_once_ends_bit_exact_with_no_worker_left_behind(tmp_path):
    reference = uninterrupted(tmp_path / "reference", tmp_path / "marks", EPOCHS)
    assert reference.returncode == 0, reference.stdout[-3000:]

    result = run_campaign(tmp_path / "killed", KILLS, tmp_path / "marks", EPOCHS)
    for kill, record in zip(KILLS, result["kills"], strict=True):
        # Every process of the killed launch is gone within seconds, before the restart needs the directory.
        assert record["workers_gone_s"] is not None and not record["survivors"], (kill, record["output"])
        assert record["workers_gone_s"] < GONE_WITHIN_S
        if kill.target == "launcher":  # each rank said why it stopped, in one line
            assert sorted(line.split(" (pid")[0] for line in record["lines"]) == ["error: rank 0", "error: rank 1"]
            assert all("its launcher" in line and "is gone" in line for line in record["lines"]), record["lines"]
        if kill.intrude:  # a second train.py on the live directory: refused, naming the owner (rank 0)
            intruder = record["intruder"]
            assert intruder["exit"] == 2 and len(intruder["owner_pids"]) == 1 and len(intruder["errors"]) == 1, intruder
            assert f"in use by training, pid {intruder['owner_pids'][0]}" in intruder["errors"][0], intruder
    assert result["final"]["exit"] == 0, result["final"]["output"]

    killed, straight = tmp_path / "killed/checkpoints/last.pt", tmp_path / "reference/checkpoints/last.pt"
    assert differing_weights(killed, straight) == []
    a, b = load_checkpoint(killed), load_checkpoint(straight)
    assert a["progress"] == b["progress"] and a["progress"]["global_step"] == EPOCHS * 2
    for killed_epoch, straight_epoch in zip(a["history"], b["history"], strict=True):
        # The losses and metrics of every epoch, to the last bit (images/s is a wall-clock figure).
        killed_epoch.pop("train/images_per_s"), straight_epoch.pop("train/images_per_s")
        assert killed_epoch == straight_epoch
