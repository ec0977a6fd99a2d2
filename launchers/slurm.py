"""Submit a pre-training run to SLURM through submitit: one task per GPU, preemption-safe, requeued until it finishes.

    python launchers/slurm.py --nodes 8 --partition gpu --time 72:00:00 --config configs/beit_proxy.yaml optim.lr=2e-3
    python launchers/slurm.py --nodes 2 --config configs/beit_proxy.yaml --dry-run   # print the sbatch script only
    python launchers/slurm.py --container-image docker://ghcr.io/me/smim_dist:1 --config ...   # tasks in an image

Submitting the same command again resumes the run (from its newest valid checkpoint), on any number of nodes. The
config, the cluster options and the run directory are checked here, before anything is submitted.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError

from smim_dist.config import Config, ConfigError, load_config
from smim_dist.engine.checkpoint import check_resumable, newest_valid_tag
from smim_dist.engine.run_dir import check_run_dir
from smim_dist.slurm_job import TrainJob

JOB_FOLDER = "slurm"
JOB_ID_FILE = "job_id"
TIME_FORMATS = (
    (r"(\d+)", (60,)),
    (r"(\d+):(\d+)", (60, 1)),
    (r"(\d+):(\d+):(\d+)", (3600, 60, 1)),
    (r"(\d+)-(\d+)", (86400, 3600)),
    (r"(\d+)-(\d+):(\d+)", (86400, 3600, 60)),
    (r"(\d+)-(\d+):(\d+):(\d+)", (86400, 3600, 60, 1)),
)
"""SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) and the seconds each field counts"""
CONTAINER_WORKDIR = "/opt/smim_dist"
"""where the project lives in the image (docker/Dockerfile)"""
CONTAINER_PYTHON = "/opt/smim_dist/docker/entrypoint.sh python"
"""the image's python, through its entrypoint (its PATH and caches; pyxis and apptainer exec skip the entrypoint)"""


def minutes(text: str) -> int:
    """A SLURM time limit in whole minutes, rounded up."""
    for pattern, seconds in TIME_FORMATS:
        match = re.fullmatch(pattern, text)
        if match:
            return -(-sum(int(value) * unit for value, unit in zip(match.groups(), seconds)) // 60)
    raise argparse.ArgumentTypeError(f"--time {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launchers/slurm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=2e-3")
    parser.add_argument("--nodes", type=positive, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="one task per GPU; 0 for CPU-only nodes")
    parser.add_argument("--tasks-per-node", type=positive, default=1, help="tasks per node when --gpus-per-node 0")
    parser.add_argument("--cpus-per-task", type=positive, default=10, help="loader workers + the training thread")
    parser.add_argument("--mem", help="memory per node, e.g. 480G (default: the partition's)")
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
                        help="run every task in this image: for pyxis an image reference (docker://..., a .sqsh "
                             "file), for apptainer a .sif file")
    parser.add_argument("--container-runtime", choices=("pyxis", "apptainer"),
                        help="pyxis: srun --container-image (the default); apptainer: srun apptainer exec")
    parser.add_argument("--container-mounts", metavar="SRC:DST[,...]",
                        help="more mounts (the output dir and the data directory are always mounted at their paths)")
    parser.add_argument("--container-workdir", metavar="DIR",
                        help=f"working directory inside the container (default {CONTAINER_WORKDIR})")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the sbatch script")
    args = parser.parse_args(argv)
    for option in ("container_runtime", "container_mounts", "container_workdir"):
        if getattr(args, option) is not None and args.container_image is None:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: only with --container-image IMAGE")
    args.container_runtime = args.container_runtime or "pyxis"
    if args.container_runtime == "apptainer" and args.container_image and not Path(args.container_image).is_file():
        parser.error(f"--container-image {args.container_image}: no such file; apptainer runs a local .sif image "
                     "(apptainer build smim_dist.sif docker-daemon://IMAGE, on a shared file system)")
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


def local_path(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:") and not any(c in path for c in ", \t\n")


def container_overrides(cfg: Config) -> list[str]:
    """The output and data paths made absolute, so that they name the same mounted directories inside the image."""
    return [f"output_dir={Path(cfg.output_dir).absolute()}",
            *([f"data.path={Path(cfg.data.path).absolute()}"] if local_path(cfg.data.path) else [])]


def container_args(args: argparse.Namespace, cfg: Config) -> list[str]:
    """srun's arguments that put each task in the image: pyxis's flags, or apptainer's command before the task's."""
    if not args.container_image:
        return []
    data = Path(cfg.data.path)
    mounts = [cfg.output_dir, *([str(data if data.is_dir() else data.parent)] if local_path(cfg.data.path) else [])]
    mounts = [f"{path}:{path}" for path in dict.fromkeys(mounts)] + (args.container_mounts or "").split(",")
    mounts = ",".join(mount for mount in mounts if mount)
    image = str(Path(args.container_image).absolute()) if Path(args.container_image).is_file() else args.container_image
    workdir = args.container_workdir or CONTAINER_WORKDIR
    if args.container_runtime == "pyxis":
        return [f"--container-image={image}", f"--container-mounts={mounts}", f"--container-workdir={workdir}"]
    return ["apptainer", "exec", *(["--nv"] if args.gpus_per_node > 0 else []), "--bind", mounts, "--pwd", workdir,
            image]


def slurm_parameters(args: argparse.Namespace, cfg: Config) -> dict:
    """submitit's SlurmExecutor parameters; the evaluation jobs get one task of the same kind. A task that dies ends
    the whole job (``--kill-on-bad-exit``) instead of leaving the others blocked in a collective until the time
    limit."""
    on_gpus = args.gpus_per_node > 0
    container = container_args(args, cfg)
    common = {"partition": args.partition, "account": args.account, "qos": args.qos, "constraint": args.constraint,
              "exclude": args.exclude, "cpus_per_task": args.cpus_per_task, "stderr_to_stdout": False}
    train = {**common, "job_name": args.name or cfg.run_name, "nodes": args.nodes, "time": args.time,
             "ntasks_per_node": args.gpus_per_node if on_gpus else args.tasks_per_node,
             "gpus_per_node": args.gpus_per_node if on_gpus else None, "mem": args.mem,
             "signal_delay_s": args.signal_delay, "srun_args": ["--kill-on-bad-exit=1", *container]}
    evaluation = {**common, "job_name": f"{train['job_name']}-eval", "nodes": 1, "ntasks_per_node": 1,
                  "gpus_per_node": 1 if on_gpus else None, "time": args.eval_time, "srun_args": container or None}
    return {"train": {k: v for k, v in train.items() if v is not None},
            "eval": {k: v for k, v in evaluation.items() if v is not None}}


def _job_in_queue(job_id: str) -> str | None:
    """The SLURM state of ``job_id`` while it is pending or running, else None."""
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    state = proc.stdout.strip()
    return state or None


def batch_split(cfg: Config, world_size: int) -> str:
    optim = cfg.optim
    return (f"global batch {optim.global_batch} = {optim.micro_batch_size(world_size)} per task x "
            f"{optim.accumulation_steps(world_size)} accumulation x {world_size}")


class ScriptOnlyExecutor(submitit.SlurmExecutor):
    """Writes the job script on any machine, for ``--dry-run`` (submitit's executor refuses to exist without srun)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def check_run(cfg: Config, world_size: int) -> None:
    """Everything that would make the job fail at start, checked on the submitting machine."""
    cfg.optim.accumulation_steps(world_size)
    id_file = cfg.run_dir / JOB_FOLDER / JOB_ID_FILE  # before the run directory's config: a queued job has none yet
    if id_file.exists() and shutil.which("squeue"):
        job_id = id_file.read_text().strip()
        state = _job_in_queue(job_id)
        if state:
            raise ConfigError(f"job {job_id} ({state}) is already training {cfg.run_dir}; wait for it or "
                              f"`scancel {job_id}` first (its checkpoint is kept, and this command resumes it)")
    if not check_run_dir(cfg):
        return
    tag, skipped = newest_valid_tag(cfg.run_dir)
    check_resumable(cfg.run_dir, tag, skipped, cfg.checkpoint.allow_fresh_start)


def submit(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"output_dir={args.output_dir}"] if args.output_dir else [])]
    cfg = load_config(args.config, overrides)
    if args.container_image:
        cfg = load_config(args.config, [*overrides, *container_overrides(cfg)])
    world_size = args.nodes * (args.gpus_per_node or args.tasks_per_node)
    check_run(cfg, world_size)
    if not args.dry_run and shutil.which("srun") is None:
        raise ConfigError("no SLURM on this machine (srun is not on PATH): run this command on the cluster's login "
                          "node (--dry-run prints the job script anywhere), or use launchers/local.py or torchrun")
    params = slurm_parameters(args, cfg)
    folder = cfg.run_dir / JOB_FOLDER
    executor_class = ScriptOnlyExecutor if args.dry_run else submitit.SlurmExecutor
    executor = executor_class(folder=folder, max_num_timeout=args.max_requeues,
                              python=CONTAINER_PYTHON if args.container_image else None)
    executor.update_parameters(**params["train"])
    job = TrainJob(config=cfg.to_dict(), max_requeues=args.max_requeues, eval_slurm=params["eval"])
    if args.dry_run:
        command = f"{executor.python} -u -m submitit.core._submit {folder}"
        print(executor._make_submission_file_text(command, "dry-run"))
        print(f"# dry run: nothing submitted; {world_size} tasks would train {cfg.run_dir}, "
              f"{batch_split(cfg, world_size)}")
        return 0
    created = not cfg.run_dir.exists()
    before = set(folder.glob("*")) if folder.exists() else set()
    try:
        submitted = executor.submit(job)
    except (FailedJobError, OSError) as err:  # sbatch's refusal, or no sbatch on this machine
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


if __name__ == "__main__":
    sys.exit(main())
