"""The training job's batch shell: the lines it runs around ``srun``, on the first node and outside any container.

SLURM's client commands are on the host, not necessarily in the image the tasks run in, so the tasks only write
requests into the run directory and this shell acts on them: it submits each evaluation job rank 0 wrote
(``eval/<tag>/job.sbatch``) within seconds, and once more after the tasks end; and when rank 0 has checkpointed
for a preemption or the time limit and asked for a requeue (``slurm/requeue.<job id>``), it requeues the job. It
keeps the tasks' exit status as the job's.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from smim_dist.eval.jobs import REFUSED, SBATCH_SCRIPT, SUBMITTED

EVAL_POLL_SECONDS = 10


def requeue_request(run_dir: Path, job_id: str) -> Path:
    """Written by rank 0 once the checkpoint is complete and the requeued job's state is saved."""
    return run_dir / "slurm" / f"requeue.{job_id}"


def setup_lines(run_dir: Path) -> list[str]:
    run = shlex.quote(str(Path(run_dir).absolute()))
    return [
        "# smim_dist: submit the evaluation jobs the training asks for, from this shell (outside any container)",
        f"smim_run={run}",
        "smim_submit_evals() {",
        "  local script dir out",
        f'  for script in "$smim_run"/eval/*/{SBATCH_SCRIPT}; do',
        f'    dir=${{script%/{SBATCH_SCRIPT}}}',
        f'    [ -f "$script" ] && [ ! -e "$dir/{SUBMITTED}" ] || continue',
        # the training job's SLURM_* variables would shape the evaluation job's srun (SLURM_CONF names the cluster)
        "    if out=$(unset $(compgen -e | grep '^SLURM_' | grep -vx SLURM_CONF); sbatch --parsable \"$script\" 2>&1)"
        "; then",
        f'      printf \'{{"slurm_job": "%s", "time": %s}}\\n\' "${{out%%;*}}" "$(date +%s)" > "$dir/{SUBMITTED}"',
        '      echo "smim_dist: submitted evaluation job ${out%%;*} ($script)"',
        "    else",
        f'      mv "$script" "$dir/{REFUSED}"',
        '      echo "smim_dist: sbatch refused the evaluation job $dir/' + REFUSED + ': $out" >&2',
        "    fi",
        "  done",
        "}",
        "smim_submit_evals",
        f"( while sleep {EVAL_POLL_SECONDS}; do smim_submit_evals; done ) &",
        "smim_eval_loop=$!",
    ]


def teardown_lines(run_dir: Path) -> list[str]:
    requeue = shlex.quote(str(requeue_request(Path(run_dir).absolute(), "")))
    return [
        "smim_status=$?",
        'kill "$smim_eval_loop" 2>/dev/null; wait "$smim_eval_loop" 2>/dev/null',
        "smim_submit_evals",
        f'if [ -e {requeue}"$SLURM_JOB_ID" ]; then',
        f'  rm -f {requeue}"$SLURM_JOB_ID"',
        '  if out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then',
        '    echo "smim_dist: requeued job $SLURM_JOB_ID; it resumes from the checkpoint just written"',
        "  else",
        '    echo "smim_dist: SLURM refused to requeue job $SLURM_JOB_ID ($out); the checkpoint is written:'
        ' submit the same launch command again to resume" >&2',
        "    exit 1",
        "  fi",
        "fi",
        'exit "$smim_status"',
    ]
