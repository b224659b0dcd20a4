"""Sweep runner: a grid of configs of one command, one run directory each (``jipguard sweep``).

    # 3 x 2 = 6 IPProtect runs of the smoke preset, one after another:
    python experiments/sweep.py --workdir runs/sweep-omega --grid omega_tr=10,50,100 --grid seed=0,1 \\
        -- --preset smoke --quiet
    python experiments/sweep.py --workdir runs/sweep-omega ... --list           # the configs and their status
    # One config per array task (SLURM; --task_index defaults to $SLURM_ARRAY_TASK_ID):
    sbatch --array=0-5 \\
        --wrap "python experiments/sweep.py --workdir runs/sweep-omega ... --task_index \\$SLURM_ARRAY_TASK_ID"

Every config is ``jipguard <command>`` (``--command``, default ipprotect) with the arguments
after ``--``, one ``--<name> <value>`` per grid axis and ``--workdir <workdir>/<config>``;
finished configs are skipped, interrupted ones resume (``jipguard.sweep``).
"""

import sys

from jipguard import sweep

if __name__ == "__main__":
  sys.exit(sweep.main(description=__doc__))
