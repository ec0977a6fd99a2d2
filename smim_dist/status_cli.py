"""``smim-status``: where a run stands, from its run directory (or one line per run of an output directory).

    smim-status runs/demo_cpu                       # state, progress and ETA, last losses, checkpoints, evaluations
    smim-status runs                                # one line per run directory in runs/
    smim-status runs/demo_cpu --plot demo.png       # losses, learning rate, throughput, evaluation scores by step
    smim-status runs/demo_cpu --json                # all of it, for scripts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from smim_dist.run_logger import duration
from smim_dist.status import Evaluation, RunStatus, is_run_dir, read_metrics, run_status


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def progress_text(status: RunStatus) -> str:
    total = f" of {status.total_steps}" if status.total_steps else ""
    epochs = f" of {status.epochs}" if status.epochs else ""
    eta = f", ETA {duration(status.eta_s)}" if status.eta_s is not None else ""
    return f"step {status.step}{total}, epoch {status.epoch:.2f}{epochs}{eta}"


def last_step_text(status: RunStatus) -> str:
    last = status.last
    ago = f" ({duration(time.time() - status.last_logged)} ago)" if status.last_logged else ""
    wait = last.get("data_wait_frac")
    return (f"loss {number(last.get('loss'), '.4f')} (image-blind {number(last.get('image_blind_loss'), '.4f')}), "
            f"lr {number(last.get('lr'), '.2e')}, {number(last.get('images_per_s'), '.0f')} img/s, "
            f"MFU {number(last.get('mfu'), '.1%')}, data-wait {number(wait, '.0%')}{ago}")


def evaluation_table(evaluations: list[Evaluation]) -> list[str]:
    scores = sorted({name for entry in evaluations for name in entry.scores})
    lines = ["    " + "  ".join([f"{'checkpoint':<16}", f"{'state':<8}", *(f"{name:>16}" for name in scores)])]
    for entry in evaluations:
        values = [number(entry.scores.get(name), ".4f") for name in scores]
        line = "    " + "  ".join([f"{entry.tag:<16}", f"{entry.state:<8}", *(f"{value:>16}" for value in values)])
        if entry.state != "done":
            line += "  " + "; ".join(part for part in (entry.job, entry.error, entry.log and f"log {entry.log}")
                                     if part)
        lines.append(line)
    return lines


def report(status: RunStatus) -> str:
    lines = [f"{status.run_dir}: {status.state} ({status.where})"]
    if status.last:
        lines += [f"  progress     {progress_text(status)}", f"  last step    {last_step_text(status)}",
                  f"  counters     {status.last.get('skipped_steps', 0)} skipped steps, "
                  f"{status.last.get('corrupt_images', 0)} corrupt images"]
    if status.slurm_job:
        requeues = "requeues unknown (no accounting here)" if status.requeues is None else (
            f"requeued {status.requeues} time(s)")
        lines.append(f"  slurm        job {status.slurm_job}, {requeues}; logs in {status.run_dir}/slurm/")
    if status.checkpoints:
        kept = ", ".join(f"{tag} {megabytes(size)}" for tag, size in status.checkpoints.items())
        lines.append(f"  checkpoints  newest valid {status.checkpoint or 'none'}; {kept}")
        lines += [f"               {line}" for line in status.damaged]
    if status.evaluations:
        lines.append("  evaluations")
        lines += evaluation_table(status.evaluations)
    return "\n".join(lines)


def one_line(status: RunStatus) -> str:
    states = [entry.state for entry in status.evaluations]
    evaluations = ", ".join(f"{states.count(state)} {state}" for state in dict.fromkeys(states)) or "none"
    total = f"/{status.total_steps}" if status.total_steps else ""
    return (f"{Path(status.run_dir).name:<24} {status.state:<9} step {status.step}{total:<8} "
            f"loss {number(status.last.get('loss'), '.4f')}  {number(status.last.get('images_per_s'), '.0f')} img/s  "
            f"ETA {duration(status.eta_s)}  checkpoint {status.checkpoint or '-'}  evaluations {evaluations}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smim-status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run directory, or an output directory holding run directories")
    parser.add_argument("--json", action="store_true", help="print the status as JSON (a list for an output directory)")
    parser.add_argument("--plot", type=Path, metavar="OUT.png",
                        help="draw the run's curves and evaluation scores against step into this PNG")
    args = parser.parse_args(argv)
    if is_run_dir(args.path):
        runs = [args.path]
    else:
        runs = sorted(p for p in args.path.iterdir() if p.is_dir() and is_run_dir(p)) if args.path.is_dir() else []
        if not runs:
            parser.error(f"{args.path} is neither a run directory (it has no config.yaml or metrics.jsonl) nor a "
                         "folder of run directories; give the output_dir/run_name a training wrote")
        if args.plot:
            parser.error(f"--plot draws one run: give one of {', '.join(str(p) for p in runs[:3])}, ...")
    if args.plot and args.plot.suffix.lower() != ".png":
        parser.error(f"--plot {args.plot}: the figure is written as PNG; name it .png")
    statuses = [run_status(run) for run in runs]
    if args.json:
        documents = [status.to_json() for status in statuses]
        print(json.dumps(documents[0] if is_run_dir(args.path) else documents, indent=1))
    elif is_run_dir(args.path):
        print(report(statuses[0]))
    else:
        print("\n".join(one_line(status) for status in statuses))
    if args.plot:
        from smim_dist.status_plot import plot_run

        plot_run(read_metrics(args.path), statuses[0].evaluations, args.plot, title=str(args.path))
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
