"""The checkpoint keeper on its own: best.pt, the top-k ranking and its files, pruning, resume."""

from __future__ import annotations

import math
from typing import Any

import pytest

from segkit.engine.keeper import CheckpointKeeper
from segkit.errors import CheckpointError
from segkit.runs.checkpoint import load_checkpoint
from segkit.runs.run_dir import BEST, LAST, RunDir


def keeper_for(tmp_path, *, mode: str = "max", save_top_k: int = 2, state: dict[str, Any] | None = None):
    keeper = CheckpointKeeper(RunDir(tmp_path), lambda: {}, monitor="val/miou", mode=mode, save_top_k=save_top_k,
                              enabled=True, is_main=True)
    # What a checkpoint holds: a model entry and the keeper's ranking as it stands when written.
    keeper.state_of = lambda: {"model": {}, "progress": keeper.ranking(), **(state or {})}
    return keeper


def ranked_files(tmp_path) -> set[str]:
    return {path.name for path in (tmp_path / "checkpoints").glob("epoch=*.pt")}


def test_scores_rank_into_best_and_top_k_and_prune_removes_what_fell_out(tmp_path):
    keeper = keeper_for(tmp_path)
    scores = [0.2, 0.5, 0.4, 0.1, 0.6]
    improved = [keeper.add_score(score, epoch) for epoch, score in enumerate(scores)]
    assert improved == [True, True, False, False, True]
    assert (keeper.best_score, keeper.best_epoch) == (0.6, 4)
    assert keeper.validations_without_improvement == 0
    assert [entry["epoch"] for entry in keeper.top_k] == [4, 1]
    assert load_checkpoint(tmp_path / "checkpoints" / BEST)["progress"]["best_epoch"] == 4
    keeper.prune()
    assert ranked_files(tmp_path) == {entry["file"] for entry in keeper.top_k}


def test_a_min_monitor_ranks_low_scores_first_and_nan_never_ranks(tmp_path):
    keeper = keeper_for(tmp_path, mode="min")
    for epoch, score in enumerate([0.9, float("nan"), 0.3, 0.7]):
        keeper.add_score(score, epoch)
    assert [entry["score"] for entry in keeper.top_k] == [0.3, 0.7]
    assert keeper.best_epoch == 2 and keeper.validations_without_improvement == 1
    assert not any(math.isnan(entry["score"]) for entry in keeper.top_k)


def test_resume_restores_the_ranking_and_a_lowered_k_prunes_the_rest(tmp_path):
    first = keeper_for(tmp_path, save_top_k=3)
    for epoch, score in enumerate([0.1, 0.3, 0.2]):
        first.add_score(score, epoch)
    first.save(LAST)
    restored: list[dict[str, Any]] = []
    again = keeper_for(tmp_path, save_top_k=1)
    assert again.resume("auto", restored.append) == tmp_path / "checkpoints" / LAST
    assert len(restored) == 1  # the trainer's part of the state, handed over once
    assert (again.best_score, again.best_epoch) == (first.best_score, first.best_epoch)
    assert [entry["epoch"] for entry in again.top_k] == [1]
    assert ranked_files(tmp_path) == {again.top_k[0]["file"]}


def test_resume_auto_without_a_checkpoint_starts_fresh_and_a_misfit_names_the_file(tmp_path):
    keeper = keeper_for(tmp_path)
    assert keeper.resume("auto", lambda state: pytest.fail("nothing to restore")) is None
    assert keeper.resume(None, lambda state: pytest.fail("resume is off")) is None
    keeper.save(LAST)

    def misfit(state: dict[str, Any]) -> None:
        raise KeyError("optimizer")

    with pytest.raises(CheckpointError, match=r"last\.pt: cannot resume from it, it does not fit this run"):
        keeper_for(tmp_path).resume("auto", misfit)


def test_nothing_is_written_with_checkpoints_off_or_off_the_main_process(tmp_path):
    for enabled, is_main in ((False, True), (True, False)):
        keeper = CheckpointKeeper(RunDir(tmp_path), lambda: {"model": {}}, monitor="val/miou", mode="max",
                                  save_top_k=2, enabled=enabled, is_main=is_main)
        keeper.add_score(0.5, 0)
        keeper.save(LAST)
    assert not (tmp_path / "checkpoints").exists()
