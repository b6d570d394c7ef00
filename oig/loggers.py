"""Experiment loggers. The local run folder is always written by the runner; these add a
remote/offline tracker. ``WandbLogger`` works with ``mode=offline`` and no network."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class NullLogger:
    def start(self, run_dir: Path, config: dict, name: str):
        pass

    def log_row(self, row: dict, images: dict | None = None):
        pass

    def finish(self, summary: dict, rows=None):
        pass


class WandbLogger(NullLogger):
    """One W&B run per oig run: config = the resolved Hydra config; one table row per sample
    (with source / edit images); summary = the run's mean metrics. Runs of a sweep share a
    ``group`` (``sweep_name`` in the config, or the multirun folder's name)."""

    def __init__(self, project: str = "oig", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, log_images: bool = True, tags: list | None = None):
        self.project, self.entity, self.mode, self.group = project, entity, mode, group
        self.log_images, self.tags = log_images, list(tags or [])
        self.run = None
        self._rows: list[dict] = []
        self._imgs: list[dict] = []

    def start(self, run_dir: Path, config: dict, name: str):
        import wandb

        group = self.group
        if group is None:  # runs of one Hydra multirun share its sweep folder's name as group
            try:
                from hydra.core.hydra_config import HydraConfig

                hc = HydraConfig.get()
                if str(hc.mode) == "RunMode.MULTIRUN":
                    group = Path(hc.sweep.dir).name
            except ValueError:  # not inside a Hydra app
                if "multirun" in Path(run_dir).parts:
                    group = Path(run_dir).parent.name
        self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, dir=str(run_dir),
                              config=config, name=name, group=group, tags=self.tags, reinit="finish_previous")
        log.info("wandb run %s (%s mode) in %s", self.run.id, self.mode, run_dir)

    def log_row(self, row: dict, images: dict | None = None):
        self._rows.append(row)
        self._imgs.append(images or {})
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.run is not None and metrics:
            self.run.log(metrics)

    def finish(self, summary: dict, rows=None):
        import wandb

        if self.run is None:
            return
        rows = self._rows
        if rows:
            cols = sorted({k for r in rows for k in r})
            img_cols = sorted({k for i in self._imgs for k in i}) if self.log_images else []
            table = wandb.Table(columns=cols + img_cols)
            for r, im in zip(rows, self._imgs):
                vals = [r.get(c) if isinstance(r.get(c), (int, float, str, bool, type(None))) else str(r.get(c))
                        for c in cols]
                vals += [wandb.Image(im[c]) if im.get(c) is not None else None for c in img_cols]
                table.add_data(*vals)
            self.run.log({"samples": table})
        for k, v in summary.items():
            self.run.summary[k] = v
        self.run.finish()
        self.run = None
