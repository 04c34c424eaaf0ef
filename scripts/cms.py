r"""Canonical Model Saliency over a dataset: resumable, bad images skipped and recorded.

python scripts/cms.py --out_dir=/tmp/cms                                  # default photos, gender model
python scripts/cms.py --images=photos/ --model=age --out_dir=out          # rerun the same command to resume
python scripts/cms.py --images=photos/ --model=gender --out_dir=out --overwrite  # replace another run's outputs
python scripts/cms.py --images=builtin:photos --config.cms.labels_csv=labels.csv --out_dir=out
python scripts/cms.py --images=300w/ --landmarks=300w/ --out_dir=out  # annotated photos: no detection (.pts)
python scripts/cms.py --images=photos/ --landmarks=points.csv --out_dir=out  # rows image,x0,y0,...,x67,y67
python scripts/cms.py --list_models                                        # what --model accepts
python scripts/cms.py --list_config                                        # every --config.<key> and its value

A multi-process job (`jax.distributed`; on CPUs the collectives go through gloo), one command per process, all
writing to the same out_dir; process 0 merges the processes' checkpoints into the final outputs:

python scripts/cms.py --out_dir=out --num_processes=2 --process_id=0 --coordinator=127.0.0.1:12345 &
python scripts/cms.py --out_dir=out --num_processes=2 --process_id=1 --coordinator=127.0.0.1:12345

On a cluster JAX finds the job itself (SLURM, a Cloud TPU pod slice, Open MPI): every process runs the same command
with --distributed, and out_dir must be a folder every host shares (docs/DISTRIBUTED.md):

srun --ntasks=8 python scripts/cms.py --images=/shared/photos --out_dir=/shared/cms --distributed
"""

import time

from absl import app, flags, logging

from canonsal_jax import cli

_CONFIG = cli.define_config()
_OVERRIDES = cli.define_overrides(landmarks=True)
_IMAGES = flags.DEFINE_string(
  "images", None, 'Folder, .txt list, glob, or "builtin:lfw" / "builtin:photos" (overrides config.cms.dataset).'
)
_OUT_DIR = flags.DEFINE_string("out_dir", "outputs", "Folder for the outputs and the checkpoint.")
_OVERWRITE = cli.define_overwrite()
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a jax.distributed job (1: no job).")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in the job, 0 .. num_processes - 1.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0's coordination service.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Join a jax.distributed job that JAX finds from the environment (SLURM, Cloud TPU pod slice, Open MPI): "
  "jax.distributed.initialize() without arguments; instead of --num_processes, --process_id, --coordinator.",
)


def main(argv):
  config = cli.resolve(_CONFIG, {**_OVERRIDES, "cms.dataset": _IMAGES})  # every value checked before anything loads
  cli.start(argv, out_dirs=[_OUT_DIR])
  if _NUM_PROCESSES.value > 1 and not _COORDINATOR.value:
    raise app.UsageError("--num_processes > 1 needs --coordinator=host:port")
  if _DISTRIBUTED.value and _NUM_PROCESSES.value > 1:
    raise app.UsageError("--distributed finds the job from the environment: leave out --num_processes")
  distributed = _DISTRIBUTED.value or _NUM_PROCESSES.value > 1
  import jax

  from canonsal_jax import datasets, manifest, runs

  with cli.user_errors() as failed:  # the photos' hashes: the manifest's "same run" test (a CMS run resumes)
    files = datasets.files_of(config.cms.dataset or datasets.default_dataset())
    images = {"spec": config.cms.dataset or "builtin:lfw", "count": len(files), "sha256": manifest.digest_files(files)}
  if failed:
    return 1
  folder = cli.claim_out_dir(
    _OUT_DIR, _OVERWRITE, config, kind="cms", inputs=cli.run_inputs(config, {"images": images})
  )
  folder.write()  # now: a killed run's folder is still its own, and resumes
  if distributed:
    if "jax_cpu_collectives_implementation" in jax.config.values:  # gloo: the barrier's collective on CPUs
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # (jax 0.10.2's default; said explicitly)
    if _DISTRIBUTED.value:
      jax.distributed.initialize()  # SLURM_*, the TPU VM's metadata, or Open MPI's variables say the job
    else:
      jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
      )
  process_index = jax.process_index()
  logging.info("process %d of %d; local devices: %s", process_index, jax.process_count(), jax.local_devices())
  start = time.perf_counter()

  def progress(done, total, name):
    rate = done / max(time.perf_counter() - start, 1e-9)
    logging.info("%d/%d images (%.2f img/s, ETA %.0f s): %s", done, total, rate, (total - done) / rate, name)

  try:
    with cli.user_errors() as failed:
      acc = runs.run_cms(config, _OUT_DIR.value, progress=progress)
  finally:
    if distributed:
      jax.distributed.shutdown()
  if failed:
    return 1
  if process_index == 0:  # process 0 writes the merged outputs last
    folder.finish()
  skipped = [r for r in acc.records() if r["status"] != "ok"]
  print(
    f"CMS of {acc.num_images('all') if 'all' in acc.groups() else 0} images ({len(skipped)} skipped), "
    f"groups {', '.join(acc.groups()) or 'none'}; wrote {_OUT_DIR.value}"
  )
  for record in skipped:
    print(f"  skipped {record['name']}: {record['reason']}")
  return 0


if __name__ == "__main__":
  cli.run(main)
