"""Where training metrics go: metrics.jsonl, TensorBoard, and the terminal.

Every logged record is one JSON line in WORKDIR/metrics.jsonl (step, loss,
loss_lm, loss_diffusion, lr, grad_norm, tokens_per_s, images_per_s, step_time,
mfu, and whatever else the step reported), the same scalars as TensorBoard
events under WORKDIR/tensorboard, and either a tqdm progress bar with ETA
(interactive terminal) or one plain log line per record (files, CI).
Only process 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from tfjax.train.flops import step_flops

log = logging.getLogger(__name__)

# The fields shown on the terminal, in order.
_SHOWN = ("loss", "loss_lm", "loss_diffusion", "grad_norm", "lr", "tokens_per_s", "mfu")


def read_history(path: str) -> list[dict[str, Any]]:
  """Every record of a metrics.jsonl as written, resume/restart markers included
  (skipping a torn last line)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The current run's records: a marker {"event": "resume"|"restart", "step": k}
  supersedes the earlier records after step k (the file keeps them all)."""
  out: list[dict[str, Any]] = []
  for r in read_history(path):
    if "event" in r:
      out = [o for o in out if o.get("step", 0) <= r.get("step", 0)]
    else:
      out.append(r)
  return out


def _scalar(v: Any) -> float | int | str:
  if isinstance(v, (str, int)):
    return v
  v = float(np.asarray(v))
  return v if math.isfinite(v) else str(v)


class MetricsWriter:
  """Appends metric records; safe to reopen on resume. Nothing is ever removed:
  a resumed run appends a marker, and `read_jsonl` drops the records it
  supersedes, so a curve never shows a step twice."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               use_tensorboard: bool = True, progress: bool | None = None, event: str = ""):
    """event: "restart" marks a run started over from step 0 in a workdir that
    has history; otherwise a workdir with records gets a "resume" marker."""
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total_steps = total_steps
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._mark(start_step, event)
    self._file = open(self.path, "a")
    if use_tensorboard:
      try:
        # Local: importing tensorboardX takes ~5 s, paid only when TensorBoard is on.
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        log.warning("tensorboardX is not installed; no TensorBoard events")
    if progress is None:
      progress = sys.stderr.isatty()
    if progress:
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
    self._t0, self._step0 = time.time(), start_step

  def _mark(self, step: int, event: str) -> None:
    """Appends a resume (or restart) marker; earlier records are never rewritten."""
    if not event and not read_history(self.path):
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "time": time.time(),
                          "event": event or "resume"}) + "\n")

  def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Records `metrics` at `step` (keys get `prefix`, e.g. "val_")."""
    record = {"step": int(step), "time": time.time()}
    record.update({prefix + k: _scalar(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "time") and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    self._show(step, record)
    return record

  def _show(self, step: int, record: dict[str, Any]) -> None:
    shown = {k: record[k] for k in _SHOWN if isinstance(record.get(k), float)}
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
      return
    rate = (step - self._step0) / max(time.time() - self._t0, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
    extra = " ".join(f"{k}={v:.4g}" for k, v in record.items()
                     if k.startswith("val_") and isinstance(v, float))
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    log.info("step %d/%d %s %s eta %s", step, self.total_steps, text, extra, eta_text)

  def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
    """image: uint8 [h, w, 3]."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(tag, image, step, dataformats="HWC")

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


class Throughput:
  """Turns a step's wall time and batch layout into tokens/s, images/s, MFU."""

  def __init__(self, model_config: Any, num_devices: int, peak_tflops_per_device: float,
               num_processes: int = 1):
    """num_devices: the devices that processed the batches passed in (this
    process's); rates are multiplied by num_processes for the whole job."""
    self.model_config = model_config
    self.num_devices = num_devices
    self.num_processes = num_processes
    self.peak = peak_tflops_per_device * 1e12

  def __call__(self, step_time: float, segment_ids: np.ndarray, image_ids: np.ndarray,
               image_valid: np.ndarray,
               text_loss_mask: np.ndarray | None = None) -> dict[str, float]:
    tokens = int((np.asarray(segment_ids) != 0).sum())
    images = int(np.asarray(image_valid).sum())
    flops = step_flops(self.model_config, segment_ids, image_ids,
                       text_loss_mask=text_loss_mask)
    out = dict(step_time=step_time, tokens_per_s=self.num_processes * tokens / step_time,
               images_per_s=self.num_processes * images / step_time,
               tflops_per_device=flops / step_time / self.num_devices / 1e12)
    out["mfu"] = flops / (step_time * self.num_devices * self.peak) if self.peak > 0 else 0.0
    return out
