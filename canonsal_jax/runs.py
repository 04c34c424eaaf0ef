"""Dataset runs: the Canonical Model Saliency of a model over a dataset, resumable, batched, multi-process.

Example:
  Lines marked +SKIP are not run as doctests: it runs the README's main job (a minute, weights fetched on first use).
  >>> from canonsal_jax import config as config_lib, runs
  >>> acc = runs.run_cms(config_lib.default_config(), "/tmp/cms")  # doctest: +SKIP
  >>> mean, valid = acc.mean("all")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from canonsal_jax import batched, canonical, cms, datasets, faces, fileio, host, outputs, pipeline, viz
from canonsal_jax import config as config_lib

__all__ = ["run_cms"]


def run_cms(
  config: ml_collections.ConfigDict,
  out_dir: str | pathlib.Path,
  *,
  dataset: str | Sequence[str] | None = None,
  progress: Callable[[int, int, str], None] | None = None,
  process_index: int | None = None,
  num_processes: int | None = None,
) -> cms.CMSAccumulator:
  """Canonical Model Saliency over a dataset, resumable: checkpoints in `out_dir/cms.npz`.

  Every image of the list gets its index; images already in the checkpoint are not redone; a bad image
  (unreadable, no face, NaN scores, diverged fit) is skipped and recorded with its reason, and nothing already
  computed is lost. Decoding and face detection run in host workers ahead of the device work (`config.cms.host_pool`,
  `host_workers`, `prefetch`; annotated photos, `config.landmarks`, are decoded only); faces go through
  the device in batches of `config.cms.face_batch` per local device (one compiled program per stage). Killed
  and run again, the result equals an uninterrupted run exactly (`cms` sums are exact and order-independent).

  In a multi-process job (`jax.distributed`), process i takes images i, i + N, ... and checkpoints them in
  `cms.process<i>.npz`; after a barrier, process 0 merges every process's checkpoint into `cms.npz` and writes
  the outputs. The merged CMS equals a single-process run's exactly.

  Args:
    config: the configuration (`config.cms`, `config.cis`, `config.occlusion`, `config.model`, ...).
    out_dir: output folder: `cms.npz` (checkpoint), `cms_<group>.npy`/`.png`, `records.json`, `summary.json`.
    dataset: overrides `config.cms.dataset` (a folder, a .txt list, a glob, or a list of paths).
    progress: called as `progress(done, total, name)` after each image (a batch's images at its end).
    process_index: this process's index (default `jax.process_index()`).
    num_processes: processes sharing the job (default `jax.process_count()`); out_dir must be shared by them.
      Without `jax.distributed` there is no barrier: run processes 1..N-1 first, process 0 last.

  Returns:
    The accumulator: on process 0 the merged one, elsewhere this process's.

  Example:
    Lines marked +SKIP are not run as doctests: it runs the README's main job (a minute, weights fetched on first use).
    >>> acc = run_cms(config_lib.default_config(), "/tmp/cms")  # doctest: +SKIP
    >>> mean, valid = acc.mean("all")  # doctest: +SKIP
  """
  out = pathlib.Path(out_dir)
  start = time.perf_counter()
  process_index = jax.process_index() if process_index is None else int(process_index)
  num_processes = jax.process_count() if num_processes is None else int(num_processes)
  if not 0 <= process_index < num_processes:
    raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
  model = pipeline.check_settings(config)  # every setting, before any photo is read
  figures = viz.FigureSettings.from_config(config)  # checked before the run, used when writing its figures
  spec = dataset if dataset is not None else (config.cms.dataset or datasets.default_dataset())
  files = datasets.files_of(spec)
  labels = datasets.read_labels(config.cms.labels_csv) if config.cms.labels_csv else None
  # Annotated photos skip detection; a malformed file is refused here, before any photo is read.
  annotations = datasets.read_landmarks(config.landmarks, files) if config.landmarks else {}
  model3d = pipeline.load_morphable(config.morphable_model)
  texture_size = config.cis.texture_size or canonical.default_texture_size(model.crop.size, model3d)
  settings = cms.CMSSettings(texture_size, normalisation=config.cms.normalisation, on_invalid="skip")
  checkpoint = outputs.checkpoint_path(out, process_index, num_processes)
  acc = cms.CMSAccumulator.load(checkpoint, settings=settings) if checkpoint.exists() else cms.CMSAccumulator(settings)
  _check_sweep_mode(acc, config, checkpoint)
  resumed_with = len(acc.done_indices())
  foreign = sorted(i for i in acc.done_indices() if i % num_processes != process_index)
  if foreign:  # the merge would meet these images twice: refuse now, not after the work
    raise ValueError(
      f"{checkpoint} holds image {foreign[0]}, which process {process_index} of {num_processes} does not take (a "
      "job with another number of processes wrote it); resume with that number of processes"
    )
  detections = pipeline.detection_cache() if config.detection_cache else None
  timings: dict[str, float] = {}
  skip = set(acc.done_indices()) | {i for i in range(len(files)) if i % num_processes != process_index}
  if config.cms.max_images > 0:  # a time-boxed run: the rest is left to the next run (resume)
    todo = [i for i in range(len(files)) if i not in skip]
    skip |= set(todo[config.cms.max_images :])
  mine = sum(1 for i in range(len(files)) if i % num_processes == process_index)
  done, processed, since_checkpoint, num_batches = len(acc.done_indices()), 0, 0, 0
  # The batched device programs run the occlusion sweep; a rival explainer goes one face at a time (cis_face).
  face_batch = int(config.cms.face_batch) if config.explainer == "occlusion" else 0
  group = face_batch * jax.local_device_count() if face_batch > 0 else 1  # faces per device call (FaceBatcher's)
  # Decoding and detection run in host workers, started now so that they overlap building the device programs;
  # the device stages below take their results in order, a bounded number of photos ahead.
  workers = config.cms.host_workers or datasets.default_workers()
  host_settings = host.HostSettings(config, str(detections.folder) if detections is not None else None)
  items = datasets.prefetch(
    [(path, annotations.get(path)) for path in files],
    functools.partial(host.load_and_detect, host_settings),
    num_workers=workers,
    pool=config.cms.host_pool,
    initializer=host.start_host_worker,
    initargs=(host_settings,),
    depth=config.cms.prefetch or max(8, 2 * workers, 2 * group),
    skip=skip,
    name_fn=lambda task: task[0],
  )
  try:
    batcher = batched.FaceBatcher(config, timings) if face_batch > 0 else None
  except BaseException:
    items.close()
    raise

  def per_image(batch: list[datasets.Prefetched]) -> list[batched.FaceOutcome | str]:
    found = []
    for item in batch:
      pixels, detection = item.value.pixels, item.value.detection
      try:
        cis = pipeline.cis_face(config, pixels, detection.face, item.name, timings=timings)
        found.append(batched.FaceOutcome.from_cis(cis))
      except ValueError as e:
        found.append(f"{type(e).__name__}: {e}")
    return found

  def flush(batch: list[datasets.Prefetched]) -> None:
    nonlocal done, processed, since_checkpoint, num_batches
    num_batches += 1 if batcher is not None else len(batch)
    if batcher is not None:
      found = batcher([(item.name, item.value.pixels, item.value.detection.face) for item in batch])
    else:
      found = per_image(batch)
    clock = pipeline.StageClock(timings)
    for item, outcome in zip(batch, found):
      detection = item.value.detection
      added = _accumulate(acc, item.index, item.name, outcome, config, labels, detection)
      if added and config.cms.save_textures:  # before the checkpoint that records the image
        fileio.save_npz(outputs.texture_path(out, item.index), texture=outcome.texture, weight=outcome.weight)
    clock.lap("accumulate")
    done += len(batch)
    processed += len(batch)
    since_checkpoint += len(batch)
    if since_checkpoint >= config.cms.checkpoint_every:
      acc.save(checkpoint)
      clock.lap("checkpoint")
      since_checkpoint = 0
    if progress is not None:
      for k, item in enumerate(batch, start=done - len(batch) + 1):
        progress(k, mine, item.name)

  pending: list[datasets.Prefetched] = []
  host_counts = {"annotated": 0, "hits": 0, "misses": 0}
  with items:
    while True:
      waiting = time.perf_counter()
      item = next(items, None)  # the device stages wait here when the host workers fall behind
      timings["host_wait"] = timings.get("host_wait", 0.0) + time.perf_counter() - waiting
      if item is None:
        break
      host_item = item.value
      if host_item is not None:
        timings["host_load_detect"] = timings.get("host_load_detect", 0.0) + host_item.seconds
        if host_item.cache_hit is not None:
          host_counts["hits" if host_item.cache_hit else "misses"] += 1
      error = item.error if item.error is not None else host_item.error
      if error is not None:
        record = {} if labels is None else {"true_label": datasets.true_label(labels, item.name)}
        acc.skip(item.index, item.name, f"{type(error).__name__}: {error}", record=record)
        done += 1
        processed += 1
        since_checkpoint += 1
        if progress is not None:
          progress(done, mine, item.name)
        continue
      host_counts["annotated"] += host_item.detection.choice == "landmarks"
      warning = host_item.detection.warning(item.name)
      if warning is not None:
        logging.warning("%s", warning)
      pending.append(item)
      if len(pending) == group:
        flush(pending)
        pending = []
    if pending:
      flush(pending)
  acc.save(checkpoint)
  elapsed = time.perf_counter() - start
  summary = outputs.run_summary(
    acc,
    listed=len(files),
    resumed_with=resumed_with,
    processed=processed,
    elapsed=elapsed,
    timings=timings,
    num_batches=num_batches,
    face_batch=face_batch,
    detection_cache=None if detections is None else {"hits": host_counts["hits"], "misses": host_counts["misses"]},
    host={"annotated": host_counts["annotated"], "pool": config.cms.host_pool, "workers": workers},
  )
  summary_name = "summary.json" if num_processes == 1 else f"summary.process{process_index}.json"
  if num_processes > 1:
    summary.update(process_index=process_index, num_processes=num_processes)
  fileio.save_json(out / summary_name, outputs.with_reproducibility(summary, config, model, model3d, texture_size))
  if num_processes > 1:
    if jax.process_count() == num_processes:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("canonsal_jax.run_cms: process checkpoints written")
    if process_index != 0:
      return acc
    acc, summary = outputs.merge_processes(
      out,
      settings,
      num_processes,
      listed=len(files),
      elapsed=time.perf_counter() - start,
      face_batch=face_batch,
    )
    acc.save(out / "cms.npz")
    fileio.save_json(out / "summary.json", outputs.with_reproducibility(summary, config, model, model3d, texture_size))
  outputs.write_cms(
    acc,
    out,
    model3d,
    render_size=config.cis.render_size,
    min_count=config.cms.min_count,
    settings=figures,
  )
  return acc


# What makes two maps comparable (not the counts). Records from before the middle stage or the fine rounds lack
# their keys: they had none (middle_every 0, one fine round).
_SWEEP_SETTINGS = ("mode", "coarse_every", "fine_fraction", "middle_every", "middle_fraction", "fine_rounds")
_SWEEP_DEFAULTS = {"middle_every": 0, "middle_fraction": 0.0, "fine_rounds": 1}


def _sweep_settings(record: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
  """The settings part of a record's `sweep`. A record without one comes from before it was recorded, when every
  map was the explainer's own (no drill-down): taken as `want` unless that is a drill-down."""
  if "sweep" not in record:
    return want if want["mode"] != "drill_down" else {"mode": "not drill-down (recorded before drill-down was)"}
  sweep = record["sweep"]
  if sweep.get("mode") == "drill_down":
    sweep = _SWEEP_DEFAULTS | sweep
  return {k: sweep[k] for k in _SWEEP_SETTINGS if k in sweep}


def _check_sweep_mode(acc: cms.CMSAccumulator, config: ml_collections.ConfigDict, checkpoint: pathlib.Path) -> None:
  """Refuses to resume a checkpoint whose maps were made another way (exact, drill-down with another lattice or
  budget, a rival method): their sum would mix maps of different fidelity.

  Raises:
    config.ConfigError: naming the `--config.occlusion.drill_down` key that differs.
  """
  if config.explainer != "occlusion":
    want = {"mode": config.explainer}
  else:
    drill = pipeline.drill_down_settings(config.occlusion)
    want = {"mode": "exact"} if drill is None else {"mode": "drill_down", **drill._asdict()}
  for record in acc.records():
    have = _sweep_settings(record, want)
    if record["status"] != "ok" or have == want:
      continue
    key = "explainer" if "drill_down" not in (have["mode"], want["mode"]) else "occlusion.drill_down.enabled"
    if have["mode"] == want["mode"] == "drill_down":
      key = next(f"occlusion.drill_down.{k}" for k in _SWEEP_SETTINGS[1:] if have.get(k) != want.get(k))
    value = config_lib.flat_items(config)
    raise config_lib.ConfigError(
      key,
      dict(value)[key],
      f"{checkpoint} holds maps made with {have} (image {record['index']}, {record['name']}); this run's would be "
      f"{want}, and the CMS would mix them: give the checkpoint's settings, another folder, or --overwrite",
    )


def _accumulate(
  acc: cms.CMSAccumulator,
  index: int,
  name: str,
  outcome: batched.FaceOutcome | str,
  config: ml_collections.ConfigDict,
  labels: dict[str, str] | None,
  detection: faces.Detection,
) -> bool:
  """Adds one face's outcome (or records why it failed) with its groups: "all", "pred_<label>", and with true
  labels "label_<label>" and "correct" / "misclassified". Returns whether it was accumulated. The record holds
  every face found in the photo and which was explained (`outputs.face_record`); an embedding model's (cosine
  score) has no prediction."""
  record: dict[str, Any] = outputs.face_record(detection.face, detection)
  true = None
  if labels is not None:
    true = datasets.true_label(labels, name)
    record["true_label"] = true
  if isinstance(outcome, str):
    acc.skip(index, name, outcome, record=record)
    return False
  # One group per predicted class; an expected value (an age) is a number, not a class: grouping by it made one
  # group per image and a difference map for every pair of them (an age CMS of 88 faces wrote ~7,000 files).
  is_class = outcome.label and not outcome.score_kind.startswith("expected_value")
  groups = ["all"] + ([f"pred_{outcome.label}"] if config.cms.group_by_prediction and is_class else [])
  if true is not None:
    groups.append(f"label_{true}")
    if outcome.label:
      groups.append("correct" if outcome.label.casefold() == true.casefold() else "misclassified")
  return acc.add(
    index,
    name,
    outcome.texture,
    outcome.weight,
    group=groups,
    record={
      **({} if outcome.score_kind.startswith("cosine") else {"prediction": outcome.label}),
      "score": outcome.score,
      "score_kind": outcome.score_kind,
      "outside_mesh_share": outcome.outside_mesh_share,
      "region_mass": outcome.region_mass,
      "sweep": outcome.sweep,
      **record,
    },
  )
