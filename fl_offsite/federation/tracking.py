"""Everything a run records: TensorBoard scalars, ``summary.json``, a progress line per round.

TensorBoard tags (step = round; round 0 is before any tuning):

- ``plugin/<metric>``: the full model with the aggregated adapter plugged in;
- ``emulator/<metric>``: the emulator with the same adapter (the gap to plug-in is what
  protects the model owner);
- ``zero_shot/<metric>``: the untouched full model, a constant reference line;
- ``clients/train_loss_mean|min|max``, ``clients/ok``, ``clients/failed``, ``clients/rejected``;
- ``traffic/bytes_down_total``, ``traffic/bytes_up_total`` (cumulative, payload bytes);
- ``aggregate/update_norm``: L2 norm of the change of the global adapter in the round;
- ``round/seconds``; ``privacy/epsilon`` with client-side DP (and ``privacy/epsilon_run`` with
  DP-SGD); and the resolved config as text under ``config``.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..fileio import atomic_write_json

MAIN_METRIC = {"lm": "ppl", "multiple-choice": "acc", "image": "acc"}


class RunLog:
    def __init__(self, run_dir: Path, config_text: str, task_kind: str):
        self.run_dir = run_dir
        self.config_text = config_text
        self.metric = MAIN_METRIC[task_kind]
        self.writer = None
        self.summary: dict = {"task": task_kind, "main_metric": self.metric}
        self.bytes_down = self.bytes_up = 0

    def _open_writer(self, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
        self.writer.add_text("config", "```\n" + self.config_text + "\n```", purge_step or 0)

    def _scalars(self, prefix: str, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def start(self, zero_shot: dict, emulator_zero_shot: dict, bundle: dict) -> None:
        self._open_writer()
        self.summary.update({"zero_shot": zero_shot, "emulator_zero_shot": emulator_zero_shot,
                             "bundle": bundle, "rounds": []})
        self._scalars("plugin", zero_shot, 0)
        self._scalars("emulator", emulator_zero_shot, 0)
        self._scalars("zero_shot", zero_shot, 0)
        self.save()
        print(f"zero-shot {self.metric} {zero_shot.get(self.metric, float('nan')):.4g}, "
              f"emulator zero-shot {emulator_zero_shot.get(self.metric, float('nan')):.4g} "
              f"(bundle {bundle['notation']}, {bundle['bytes'] / 1e6:.2f} MB)", flush=True)

    def resume(self, last_round: int, bytes_down: int, bytes_up: int) -> None:
        """Continue after ``last_round``: later rounds in summary.json and TensorBoard (from a
        crash mid-round) are dropped."""
        import json

        self.summary = json.loads((self.run_dir / "summary.json").read_text())
        self.summary["rounds"] = [r for r in self.summary["rounds"] if r["round"] <= last_round]
        self.bytes_down, self.bytes_up = bytes_down, bytes_up
        self._open_writer(purge_step=last_round + 1)
        self.save()

    def round(self, record: dict, total_rounds: int) -> None:
        step = record["round"]
        self.bytes_down += record["bytes_down"]
        self.bytes_up += record["bytes_up"]
        record["bytes_down_total"] = self.bytes_down
        record["bytes_up_total"] = self.bytes_up
        self._scalars("plugin", record["plugin"], step)
        self._scalars("emulator", record["emulator"], step)
        self._scalars("zero_shot", self.summary["zero_shot"], step)
        self._scalars("clients", {"ok": record["clients_ok"], "failed": record["clients_failed"],
                                  "rejected": record["clients_rejected"],
                                  **{f"train_loss_{k}": v for k, v in record["train_loss"].items()}},
                      step)
        self._scalars("traffic", {"bytes_down_total": self.bytes_down,
                                  "bytes_up_total": self.bytes_up}, step)
        self._scalars("aggregate", {"update_norm": record["update_norm"]}, step)
        self._scalars("round", {"seconds": record["seconds"]}, step)
        if "dp" in record:
            self._scalars("privacy", {k: record["dp"][k] for k in ("epsilon", "epsilon_run")
                                      if record["dp"].get(k) is not None}, step)
        if "realign" in record:
            realign = record["realign"]
            self._scalars("realign", {"nmse_before": realign["nmse_before"],
                                      "nmse_after": realign["nmse_after"],
                                      **{f"emulator_{k}": v for k, v in realign["emulator"].items()}},
                          step)
        self.writer.flush()
        self.summary["rounds"].append(record)
        self.save()
        emu = record["emulator"].get(self.metric, float("nan"))
        rejected = f", {record['clients_rejected']} rejected" if record["clients_rejected"] else ""
        plugin = (f"plug-in {self.metric} {record['plugin'][self.metric]:.4g} (zero-shot "
                  f"{self.summary['zero_shot'].get(self.metric, float('nan')):.4g}) | "
                  if record["plugin"] else "")
        print(f"round {step}/{total_rounds}: clients {record['clients_ok']} ok, "
              f"{record['clients_failed']} failed{rejected} | {plugin}"
              + (f"emulator {self.metric} {emu:.4g} | " if record["emulator"] else "")
              + f"{record['seconds']:.1f}s"
              + ("" if record["updated"] else " | adapter kept (too few valid uploads)"),
              flush=True)

    def save(self) -> None:
        atomic_write_json(self.run_dir / "summary.json", self.summary)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
