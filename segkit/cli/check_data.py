"""`segkit-check-data <overrides>`: scan every split of a data set and report all problems at once.

Each finding is printed as one line naming its file, classified as training classifies it
(segkit.data.readers.base.classify): an error stops training, a warning is logged by it.
Exit status: 0 no error (warnings allowed), 1 errors found, 2 config error.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from segkit.cli.common import hydra_main, register_configs, run_or_exit
from segkit.errors import ConfigError

register_configs()


def run(cfg: DictConfig) -> int:
    """Print problems and statistics; return the exit status."""
    from segkit.tools.checks import (
        check_split,
        is_warning,
        plural,
        problem_kinds,
        summary_lines,
        write_preview,
        write_weights,
    )
    from segkit.tools.page import check_options, prepare_folder, write_dataset_page

    check_options(cfg.page_thumb_size, cfg.page_image_size, cfg.page_workers)
    if cfg.page:
        prepare_folder(cfg.page)  # a link or a file there is refused before the scan
    dataset = cfg.dataset
    if 0 <= dataset.ignore_index < dataset.num_classes:
        raise ConfigError("dataset.ignore_index", f"{dataset.ignore_index} is a real class id "
                          f"(num_classes={dataset.num_classes}); use a value outside [0, num_classes)")
    reports = [check_split(dataset, split) for split in cfg.splits]
    problems = [problem for report in reports for problem in report.problems]
    for report in reports:
        for problem in report.problems:
            print(f"{report.split}: {'warning: ' if is_warning(problem) else ''}{problem}")
    for report in reports:
        print("\n".join(summary_lines(report)))
    train = next((r for r in reports if r.split == "train" and r.pixel_counts is not None), None)
    if cfg.write_weights:
        if train is None:
            raise ConfigError("write_weights", "needs a readable train split (splits must include train)")
        weights = write_weights(cfg.write_weights, train)
        print(f"class weights -> {cfg.write_weights}: {weights}")
    if cfg.preview:
        source = train or next((r for r in reports if r.dataset is not None), None)
        written = write_preview(cfg.preview, source, cfg.preview_count, cfg.preview_size) if source else None
        print(f"preview -> {written}" if written else "preview: no readable sample to draw")
    if cfg.page:
        page = write_dataset_page(cfg.page, reports, dataset, thumb_size=cfg.page_thumb_size,
                                  image_size=cfg.page_image_size, workers=cfg.page_workers,
                                  progress_bar=cfg.progress_bar)
        print(f"page -> {page}")
    warnings = sum(map(is_warning, problems))
    errors = len(problems) - warnings
    if problems:
        counts = ", ".join(f"{kind}: {count}" for kind, count in sorted(problem_kinds(problems).items()))
        print(f"{plural(len(problems), 'problem')} found: {plural(errors, 'error')}, "
              f"{plural(warnings, 'warning')} ({counts})")
    else:
        print("no problems found")
    return 1 if errors else 0


@hydra_main("check_data")
def main(cfg: DictConfig) -> None:
    sys.exit(run_or_exit(lambda: run(cfg)))


if __name__ == "__main__":
    main()
