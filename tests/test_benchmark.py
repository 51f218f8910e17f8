"""The benchmark harness: interleaved windows, paired ratios, the reference transforms, the written tables."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable

import pytest
import torch
from torchvision import tv_tensors

from segkit.benchmark import Timing, interleave
from segkit.errors import ConfigError
from segkit.reference_pipeline import torchvision_transforms

from .conftest import ROOT, TINY

ROW = re.compile(r"^\| (?P<label>[^|]+) \| (?P<median>[\d.]+) \| (?P<low>[\d.]+) – (?P<high>[\d.]+) "
                 r"\| (?P<peak>[^|]+) \|$")


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_windows_of_the_variants_are_interleaved():
    calls: list[str] = []

    def variant(name: str) -> Callable[[], int]:
        def step() -> int:
            calls.append(name)
            return 2
        return step

    variants = {name: variant(name) for name in ("a", "b")}
    timing = interleave(variants, torch.device("cpu"), windows=2, steps=3, settle=1, warmup=1)
    assert calls == ["a", "b"] + (["a"] * 4 + ["b"] * 4) * 2  # warm-up, then (settle + steps) per window, in turns
    assert [len(timing.rows[name]) for name in ("a", "b")] == [2, 2]
    assert all(value > 0 for values in timing.rows.values() for value in values)


def test_ratio_is_the_median_of_the_per_round_ratios():
    timing = Timing("", {"segkit": [2.0, 4.0, 10.0], "ceiling": [1.0, 4.0, 1.0]})
    assert timing.ratio("segkit", "ceiling") == 2.0  # rounds 2, 1, 10; the ratio of medians would be 4
    assert timing.median("segkit") == 4.0


def test_reference_transforms_fill_invented_mask_pixels_with_ignore():
    kornia = [{"_target_": "kornia.augmentation.RandomAffine", "degrees": 30, "scale": [0.5, 0.5], "p": 1.0},
              {"_target_": "kornia.augmentation.ColorJiggle", "brightness": 0.3, "p": 0.8}]
    transforms = torchvision_transforms(kornia, [24, 24], ignore_index=255)
    image = tv_tensors.Image(torch.full((3, 32, 32), 200, dtype=torch.uint8))
    image, mask = transforms(image, tv_tensors.Mask(torch.ones(32, 32, dtype=torch.int64)))
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert mask.shape == (24, 24) and set(mask.unique().tolist()) == {1, 255}  # scale 0.5 leaves a border


def test_reference_transforms_refuse_an_unknown_augmentation():
    with pytest.raises(ConfigError, match="augmentation: .*RandomElasticTransform"):
        torchvision_transforms([{"_target_": "kornia.augmentation.RandomElasticTransform"}], None, 255)


def test_harness_runs_end_to_end_and_appends_well_formed_tables(tmp_path, capsys):
    output = tmp_path / "benchmarks.md"
    output.write_text("# Benchmarks\n")
    args = ["all", *TINY, "trainer.num_workers=1", "--windows", "2", "--steps", "1", "--warmup", "1",
            "--output", str(output)]
    assert _load_script().main(args) == 0
    text = output.read_text()
    assert text.startswith("# Benchmarks\n") and text.count("\n### ") == 1  # appended, not overwritten
    assert "`python scripts/benchmark.py all backbone.name=test_resnet" in text and "load average" in text
    matches = [ROW.match(line) for line in text.splitlines() if line.startswith("| ") and "---" not in line
               and not line.startswith("| variant")]
    rows = [row for row in matches if row is not None]
    assert len(rows) == len(matches) == 9  # train 4, eval 2, data 3
    labels = [row["label"] for row in rows]
    for word in ("ceiling", "segkit", "bare loop", "reference", "whole image", "sliding window", "decode",
                 "augmentation on cpu"):
        assert any(word in label for label in labels), word
    for row in rows:
        low, median, high = float(row["low"]), float(row["median"]), float(row["high"])
        assert 0 < low <= median <= high
        assert row["peak"].strip() == "n/a (CPU)"
    ratios = re.search(r"segkit / ceiling = \*\*([\d.]+)\*\*, segkit / bare loop = \*\*([\d.]+)\*\*, "
                       r"segkit / reference = \*\*([\d.]+)\*\*", text)
    assert ratios and all(float(ratios[i]) > 0 for i in (1, 2, 3))
    assert "segkit / ceiling" in capsys.readouterr().out


def test_the_precision_table_times_each_precision_and_layout_against_fp32(tmp_path):
    output = tmp_path / "benchmarks.md"
    args = ["precision", *TINY, "--windows", "2", "--steps", "1", "--warmup", "1", "--output", str(output)]
    assert _load_script().main(args) == 0
    text = output.read_text()
    rows = [row for line in text.splitlines() if (row := ROW.match(line)) is not None]
    assert [row["label"] for row in rows] == [
        "ceiling step, trainer.precision=32, channels_last False",
        "ceiling step, trainer.precision=32, channels_last True",
        "ceiling step, trainer.precision=bf16-mixed, channels_last False",
        "ceiling step, trainer.precision=bf16-mixed, channels_last True"]
    ratios = re.findall(r"(fp32 channels_last|bf16|bf16 channels_last) / fp32 = \*\*([\d.]+)\*\*", text)
    assert [name for name, _ in ratios] == ["fp32 channels_last", "bf16", "bf16 channels_last"]
    assert all(float(value) > 0 for _, value in ratios)


def test_harness_times_the_device_cache_path(tmp_path):
    output = tmp_path / "benchmarks.md"
    args = ["train", *TINY, "dataset.cache=device", "--windows", "1", "--steps", "1", "--warmup", "0",
            "--output", str(output)]
    assert _load_script().main(args) == 0
    text = output.read_text()
    assert "dataset.cache=device" in text
    assert "segkit: TrainStep.backward + optimizer_step, device cache" in text
    assert "bare loop: handwritten, device cache" in text
