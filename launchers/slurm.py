"""Submit a pre-training run to SLURM through submitit: one task per GPU, preemption-safe, requeued until it finishes.

    python launchers/slurm.py --nodes 8 --partition gpu --time 72:00:00 --config configs/beit_proxy.yaml optim.lr=2e-3
    python launchers/slurm.py --nodes 2 --config configs/beit_proxy.yaml --dry-run   # print the sbatch scripts only
    python launchers/slurm.py --container-image docker://ghcr.io#me/smim_dist:1 --config ...   # tasks in an image
    python launchers/slurm.py --setup 'module load cuda/12.4' --setup 'export NCCL_SOCKET_IFNAME=ib0' --config ...

Submitting the same command again resumes the run (from its newest valid checkpoint), on any number of nodes; a
finished run submits nothing. The config, the cluster options, the files the run reads, the run directory and what
the scheduler will accept are all checked here, before anything is submitted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError

from smim_dist.cli_types import minutes, positive
from smim_dist.config import Config, ConfigError, load_config
from smim_dist.preflight import missing_files
from smim_dist.engine.checkpoint import check_resumable, checkpoint_meta, checkpoint_root, newest_valid_tag
from smim_dist.engine.run_dir import check_run_dir
from smim_dist.engine.run_lock import check_free
from smim_dist.eval.jobs import SlurmEvalJobs, eval_job_script
from smim_dist.slurm_batch import setup_lines, teardown_lines
from smim_dist.slurm_cluster import (JOB_FOLDER, JOB_ID_FILE, controller_problem, find_partition, queued_state,
                                     test_only)
from smim_dist.slurm_container import (CONTAINER_PYTHON, CONTAINER_WORKDIR, container_args, container_overrides,
                                       enroot_image_hint)
from smim_dist.slurm_job import TrainJob



class NotSubmitted(Exception):
    """The job could be described but not submitted (SLURM missing, the run busy, the scheduler refusing)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launchers/slurm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=2e-3")
    parser.add_argument("--nodes", type=positive, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="one task per GPU; 0 for CPU-only nodes")
    parser.add_argument("--tasks-per-node", type=positive, default=1, help="tasks per node when --gpus-per-node 0")
    parser.add_argument("--cpus-per-task", type=positive, default=10, help="loader workers + the training thread")
    parser.add_argument("--mem", help="memory per node, e.g. 480G; default: the whole node's (0) on GPU nodes, the "
                                      "partition's default on CPU nodes")
    parser.add_argument("--exclusive", action="store_true", help="no other job on the training job's nodes")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="a shell line the job runs before its tasks start, e.g. 'module load cuda/12.4' or "
                             "'export NCCL_SOCKET_IFNAME=ib0' (repeatable; evaluation jobs run them too)")
    parser.add_argument("--time", type=minutes, default=minutes("3-00:00:00"),
                        help="time limit per job (the run is requeued until done); default 3-00:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--exclude", help="nodes to avoid, e.g. node[12-14]")
    parser.add_argument("--name", help="job name (default: the config's run_name)")
    parser.add_argument("--output-dir", help="where run directories go (the config's output_dir)")
    parser.add_argument("--signal-delay", type=positive, default=120, metavar="SECONDS",
                        help="USR2 this long before the time limit: enough for one step and a checkpoint")
    parser.add_argument("--max-requeues", type=int, default=50, help="after this many requeues the job ends")
    parser.add_argument("--eval-time", type=minutes, default=60, help="time limit of each evaluation job")
    parser.add_argument("--container-image", metavar="IMAGE",
                        help="run every task in this image: for pyxis an enroot reference "
                             "(docker://[REGISTRY#]IMAGE[:TAG]) or a .sqsh file, for apptainer a .sif file")
    parser.add_argument("--container-runtime", choices=("pyxis", "apptainer"),
                        help="pyxis: srun --container-image (the default); apptainer: srun apptainer exec")
    parser.add_argument("--container-mounts", metavar="SRC:DST[,...]",
                        help="more mounts (the output dir and every file the config reads are mounted at their "
                             "paths)")
    parser.add_argument("--container-workdir", metavar="DIR",
                        help=f"working directory inside the container (default {CONTAINER_WORKDIR})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch scripts (training and evaluation jobs) and every problem found")
    args = parser.parse_intermixed_args(argv)
    for option in ("container_runtime", "container_mounts", "container_workdir"):
        if getattr(args, option) is not None and args.container_image is None:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: only with --container-image IMAGE")
    args.container_runtime = args.container_runtime or "pyxis"
    if args.container_runtime == "apptainer" and args.container_image and not Path(args.container_image).is_file():
        parser.error(f"--container-image {args.container_image}: no such file; apptainer runs a local .sif image "
                     "(apptainer build smim_dist.sif docker-daemon://IMAGE, on a shared file system)")
    if args.container_runtime == "pyxis" and args.container_image and not Path(args.container_image).is_file():
        hint = enroot_image_hint(args.container_image)
        if hint:
            parser.error(f"--container-image {args.container_image}: enroot (under pyxis) separates the registry "
                         f"with '#', or it looks for the image on Docker Hub; write {hint}")
    for mount in args.container_mounts.split(",") if args.container_mounts is not None else ():
        source, _, rest = mount.partition(":")
        if not source.startswith("/") or rest and not rest.startswith("/"):
            parser.error(f"--container-mounts {args.container_mounts}: {mount!r} is not SRC[:DST[:FLAGS]] with "
                         "absolute paths")
    if args.container_workdir is not None and not args.container_workdir.startswith("/"):
        parser.error(f"--container-workdir {args.container_workdir}: give an absolute path inside the image")
    if args.gpus_per_node < 0:
        parser.error(f"--gpus-per-node {args.gpus_per_node}: must be 0 (CPU nodes) or more")
    if args.max_requeues < 0:
        parser.error(f"--max-requeues {args.max_requeues}: must be 0 or more")
    if args.time * 60 - args.signal_delay < 60:
        parser.error(f"--signal-delay {args.signal_delay} s leaves less than a minute of --time {args.time} min before "
                     "the signal, and SLURM may send it up to 60 s early, before training has started; lower the "
                     "delay or raise --time")
    return args


def slurm_parameters(args: argparse.Namespace, cfg: Config) -> tuple[dict, SlurmEvalJobs]:
    """submitit's SlurmExecutor parameters of the training job, and how its evaluation jobs are written (one task of
    the same kind). A task that dies ends the whole job (``--kill-on-bad-exit``) instead of leaving the others
    blocked in a collective until the time limit. ``--requeue``: a site whose jobs are not requeueable by default
    (``JobRequeue=0``) would refuse the requeue after a preemption's checkpoint."""
    on_gpus = args.gpus_per_node > 0
    container = container_args(args.container_image, args.container_runtime, args.container_mounts,
                               args.container_workdir, args.gpus_per_node > 0, cfg)
    common = {"partition": args.partition, "account": args.account, "qos": args.qos, "constraint": args.constraint,
              "exclude": args.exclude, "cpus_per_task": args.cpus_per_task, "setup": args.setup or None}
    train = {**common, "job_name": args.name or cfg.run_name, "nodes": args.nodes, "time": args.time,
             "ntasks_per_node": args.gpus_per_node if on_gpus else args.tasks_per_node,
             "gpus_per_node": args.gpus_per_node if on_gpus else None,
             "mem": args.mem if args.mem is not None else "0" if on_gpus else None,
             "exclusive": args.exclusive or None, "signal_delay_s": args.signal_delay, "stderr_to_stdout": False,
             "setup": [*args.setup, *setup_lines(cfg.run_dir)], "teardown": teardown_lines(cfg.run_dir),
             "srun_args": ["--kill-on-bad-exit=1", *container], "additional_parameters": {"requeue": True}}
    evaluation = {**common, "job_name": f"{train['job_name']}-eval", "nodes": 1, "ntasks_per_node": 1,
                  "gpus_per_node": 1 if on_gpus else None, "time": args.eval_time, "srun_args": container or None}
    python = CONTAINER_PYTHON if args.container_image else sys.executable
    return ({k: v for k, v in train.items() if v is not None},
            SlurmEvalJobs(python=python, sbatch={k: v for k, v in evaluation.items() if v is not None}))


def batch_split(cfg: Config, world_size: int) -> str:
    optim = cfg.optim
    return (f"global batch {optim.global_batch} = {optim.micro_batch_size(world_size)} per task x "
            f"{optim.accumulation_steps(world_size)} accumulation x {world_size}")


class TrainingExecutor(submitit.SlurmExecutor):
    """submitit's executor, able to write the job script on any machine (for ``--dry-run``: submitit's own refuses to
    exist without srun; a real submission checks for sbatch first), and with ``--requeue`` on sbatch's command line
    too: there it wins over a site's ``SBATCH_NO_REQUEUE``, which overrides the script's ``#SBATCH --requeue``."""

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return ["sbatch", "--requeue", str(submission_file_path)]


def check_run(cfg: Config, world_size: int) -> str | None:
    """Everything about the run directory that would make the job fail or do nothing; returns why nothing needs
    submitting, for a finished run."""
    cfg.optim.accumulation_steps(world_size)
    id_file = cfg.run_dir / JOB_FOLDER / JOB_ID_FILE  # before the run directory's config: a queued job has none yet
    if id_file.exists():
        job_id = id_file.read_text().strip()
        state = queued_state(job_id)
        if state:
            raise NotSubmitted(f"job {job_id} ({state}) is already training {cfg.run_dir}; wait for it or "
                               f"`scancel {job_id}` first (its checkpoint is kept, and this command resumes it)")
    try:
        check_free(cfg.run_dir)
    except ConfigError as busy:
        raise NotSubmitted(str(busy)) from None
    if not check_run_dir(cfg):
        return None
    tag, skipped = newest_valid_tag(cfg.run_dir, hashes=False)
    check_resumable(cfg.run_dir, tag, skipped, cfg.checkpoint.allow_fresh_start)
    if tag is not None and checkpoint_meta(cfg.run_dir, tag)["epoch"] >= cfg.optim.epochs:
        return (f"{cfg.run_dir} already finished its {cfg.optim.epochs} epochs ({checkpoint_root(cfg.run_dir) / tag});"
                " nothing submitted. To train longer, raise optim.epochs under a new run_name")
    return None


def asks(params: dict) -> str:
    """What a job asks of each node, as a refusal quotes it."""
    gpus = f", {params['gpus_per_node']} GPUs" if params.get("gpus_per_node") else ""
    return (f"{params['ntasks_per_node']} tasks x {params['cpus_per_task']} CPUs{gpus} per node, "
            f"--mem {params.get('mem', 'default')}")


def scheduler_problems(args: argparse.Namespace, scripts: dict[str, str], requests: dict[str, str]) -> list[str]:
    """What the scheduler says about each job: sbatch --test-only's refusals and time limits above the
    partition's, each with what the partition offers."""
    unreachable = controller_problem()
    if unreachable:
        return [unreachable]
    partition = find_partition(args.partition)
    problems = []
    for what, limit, note in (("--time", args.time, ": the run is requeued until it is done"),
                              ("--eval-time", args.eval_time, "")):
        if partition and partition.max_minutes is not None and limit > partition.max_minutes:
            problems.append(f"{what} {limit} min is above the {partition.max_minutes} min limit of partition "
                            f"{partition.name}; the job would wait forever (PartitionTimeLimit). Use {what} "
                            f"{partition.max_minutes} or less{note}")
    for job, script in scripts.items():
        refusal = test_only(script)
        if refusal:
            hint = ("; on nodes without GPUs use --gpus-per-node 0 (and --tasks-per-node N)"
                    if "generic resource" in refusal.lower() else "")
            offers = f"; {partition.offers()}" if partition else ""
            problems.append(f"sbatch --test-only refuses the {job} job ({requests[job]}): {refusal}{offers}{hint}")
    return problems


def submit(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"output_dir={args.output_dir}"] if args.output_dir else [])]
    cfg = load_config(args.config, overrides)
    if args.container_image:
        cfg = load_config(args.config, [*overrides, *container_overrides(cfg)])
    world_size = args.nodes * (args.gpus_per_node or args.tasks_per_node)
    finished = check_run(cfg, world_size)
    if finished:
        print(f"launchers/slurm.py: {finished}")
        return 0
    params, eval_jobs = slurm_parameters(args, cfg)
    folder = cfg.run_dir / JOB_FOLDER
    executor = TrainingExecutor(folder=folder, max_num_timeout=args.max_requeues,
                                python=CONTAINER_PYTHON if args.container_image else None)
    executor.update_parameters(**params)
    scripts = {"training": executor._make_submission_file_text(
        f"{executor.python} -u -m submitit.core._submit {folder}", "check")}
    if cfg.eval.every_epochs:
        scripts["evaluation"] = eval_job_script(checkpoint_root(cfg.run_dir.absolute()) / "step_N", eval_jobs)
    requests = {"training": asks(params), "evaluation": asks(eval_jobs.sbatch)}
    if shutil.which("sbatch"):
        problems = missing_files(cfg) + scheduler_problems(args, scripts, requests)
    else:
        problems = missing_files(cfg) + ([] if args.dry_run else [
            "no SLURM on this machine (sbatch is not on PATH): run this command on the cluster's login node "
            "(--dry-run prints the job scripts anywhere), or use launchers/local.py or torchrun"])
    if args.dry_run:
        for job, script in scripts.items():
            print(f"# ---- the {job} job's sbatch script" + (" (one per evaluated checkpoint, submitted by the "
                                                            "training job)" if job == "evaluation" else ""))
            print(script)
        print(f"# dry run: nothing submitted; {world_size} tasks would train {cfg.run_dir}, "
              f"{batch_split(cfg, world_size)}")
        for problem in problems:
            print(f"launchers/slurm.py: warning: {problem}", file=sys.stderr)
        return 0
    if problems:
        raise NotSubmitted(problems[0] if len(problems) == 1 else
                           f"{len(problems)} problems:" + "".join(f"\n  - {p}" for p in problems))
    job = TrainJob(config=cfg.to_dict(), max_requeues=args.max_requeues,
                   eval_slurm=eval_jobs if cfg.eval.every_epochs else None)
    created = not cfg.run_dir.exists()
    before = set(folder.glob("*")) if folder.exists() else set()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal, which is raised too
            submitted = executor.submit(job)
    except (FailedJobError, OSError) as err:
        if created:
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        else:
            for path in set(folder.glob("*")) - before:
                path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)
        print(f"launchers/slurm.py: sbatch refused the job, nothing was submitted: {err}", file=sys.stderr)
        return 1
    (folder / JOB_ID_FILE).write_text(submitted.job_id + "\n")
    print(f"submitted job {submitted.job_id}: {world_size} tasks on {args.nodes} node(s), "
          f"{batch_split(cfg, world_size)}\n"
          f"run directory: {cfg.run_dir}\n"
          f"follow it:     tail -f {folder}/{submitted.job_id}_0_log.err     (metrics: {cfg.run_dir}/metrics.jsonl)\n"
          f"stop it:       scancel {submitted.job_id}     (resubmit this command to resume)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return submit(args)
    except ConfigError as err:
        print(f"launchers/slurm.py: config error: {err}", file=sys.stderr)
        return 2
    except NotSubmitted as err:
        print(f"launchers/slurm.py: not submitted: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
