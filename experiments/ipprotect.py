"""IPProtect main job: sanitize a buyer dataset and measure utility and security.

    python experiments/ipprotect.py --omega_tr 100                 # embedded Fashion-MNIST subset
    python experiments/ipprotect.py --preset smoke --workdir /tmp/s # seconds
    python experiments/ipprotect.py --dataset fashion_mnist --preset paper
    python experiments/ipprotect.py --mesh 1,8                     # images over 8 devices
    python experiments/ipprotect.py --distributed auto --mesh 4,16 # every host of a TPU pod / SLURM job

Writes a run directory (default runs/ipprotect-<dataset>-<preset>-tr<omega_tr>-s<seed>):
config.json, metrics.json, report.md, sanitized.npz, examples.png, sellers.png, checkpoints/.
Rerunning the same command resumes: trained ensembles are reused and sanitization continues
at the next unfinished batch. Run time and results of the default preset are in README.
"""

import json
import sys

from jipguard import distributed, pipeline, sharding


def _parser():
  return pipeline.flag_parser(__doc__)


def parse(argv=None) -> tuple[pipeline.IPProtectConfig, str, bool]:
  """``(config, run directory, quiet)`` from the command line (``pipeline.config_from_flags``)."""
  return pipeline.config_from_flags(argv, description=__doc__)


def main(argv=None) -> int:
  a = _parser().parse_args(argv)
  distributed.initialize_from_flags(a)  # Before any computation.
  distributed.interrupt_on_sigterm()  # A terminated run saves its finished epochs.
  cfg, workdir, quiet = pipeline.config_from_args(a)
  mesh = sharding.make_mesh(*a.mesh) if a.mesh else None
  m = pipeline.run(cfg, workdir, progress=not quiet and distributed.is_main_process(), mesh=mesh)
  if not distributed.is_main_process():
    return 0
  keys = ("utility_mae", "rank_correlation", "compliance_train", "compliance_val", "compliance_lower_bound",
          "correlation_mean", "ssim_mean", "images_per_second")
  print(json.dumps({k: m[k] for k in keys}, indent=2))
  print(f"run directory: {workdir} (report.md, metrics.json, sanitized.npz, examples.png)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
