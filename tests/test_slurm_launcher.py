"""``launchers/slurm.py`` without a cluster: the sbatch script it would submit, and every refusal before submission."""

import argparse
import contextlib
import importlib.util
import io
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, tiny_overrides
from smim_dist.config import load_config, save_config

TINY_CONFIG = "configs/demo_cpu.yaml"
spec = importlib.util.spec_from_file_location("slurm_launcher", REPO / "launchers" / "slurm.py")
slurm_launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(slurm_launcher)


def launch(*args, check=False):
    """The launcher's ``main`` in this process (its imports cost more than the checks themselves)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(REPO):
        try:
            code = slurm_launcher.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    assert not check or code == 0, proc.stderr
    return proc


@pytest.mark.parametrize("text, expected", [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-2", 1560),
                                            ("1-02:30", 1590), ("0-00:00:01", 1), ("3:00", 3)])
def test_every_slurm_time_format_in_minutes_rounded_up(text, expected):
    assert slurm_launcher.minutes(text) == expected


@pytest.mark.parametrize("text", ["1:2:3:4", "1-", "-5", "1h", ""])
def test_a_malformed_time_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="use minutes, HH:MM:SS or D-HH:MM:SS"):
        slurm_launcher.minutes(text)


def test_dry_run_prints_the_sbatch_script_and_creates_nothing(tmp_path):
    proc = launch("--config", TINY_CONFIG, "--nodes", "4", "--partition", "h100", "--account", "vision",
                  "--qos", "high", "--time", "2-00:00:00", "--constraint", "h100&ib", "--exclude", "node[3-4]",
                  "--mem", "480G", "--signal-delay", "300", "--output-dir", str(tmp_path), "--dry-run",
                  "run_name=big", "optim.micro_batch=2", check=True)
    script = proc.stdout
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--partition=h100",
                 "--account=vision", "--qos=high", "--time=2880", "--constraint='h100&ib'", "--exclude='node[3-4]'",
                 "--mem=480G", "--signal=USR2@300", "--job-name=big"):
        assert f"#SBATCH {line}\n" in script, line
    assert "srun" in script and "--kill-on-bad-exit=1" in script and "submitit.core._submit" in script
    assert f"32 tasks would train {tmp_path / 'big'}" in script
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


@pytest.mark.parametrize("nodes, gpus, split", [("8", "8", "32 per task x 1 accumulation x 64"),
                                                 ("1", "8", "256 per task x 1 accumulation x 8"),
                                                 ("1", "1", "256 per task x 8 accumulation x 1")])
def test_the_paper_config_splits_its_global_batch_on_any_cluster(tmp_path, nodes, gpus, split):
    beton = tmp_path / "in1k.beton"
    beton.touch()
    proc = launch("--config", "configs/maskfeat_proxy.yaml", "--nodes", nodes, "--gpus-per-node", gpus, "--dry-run",
                  f"output_dir={tmp_path}", f"data.path={beton}", check=True)
    assert f"global batch 2048 = {split}" in proc.stdout


def test_without_slurm_only_the_dry_run_works(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    args = ["--config", TINY_CONFIG, "--output-dir", str(tmp_path / "runs")]
    assert "#SBATCH --nodes=1" in launch(*args, "--dry-run", check=True).stdout
    proc = launch(*args)
    assert proc.returncode == 2 and "no SLURM on this machine (sbatch is not on PATH)" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_submitting_imports_none_of_the_trainer(tmp_path):
    """A login node checks and submits without DeepSpeed (which probes for accelerators and prints about it), FFCV,
    timm or wandb: the job imports the trainer on the compute node."""
    code = textwrap.dedent(f"""
        import contextlib, io, runpy, sys
        sys.argv = ["launchers/slurm.py", "--config", "{TINY_CONFIG}", "--dry-run", "output_dir={tmp_path}",
                    "optim.micro_batch=8"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                runpy.run_path("launchers/slurm.py", run_name="__main__")
            except SystemExit as exit_:
                assert exit_.code == 0, exit_.code
        assert "tasks would train" in out.getvalue()
        print(sorted({{name.split(".")[0] for name in sys.modules}} & {{"deepspeed", "ffcv", "timm", "wandb"}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cpu_nodes_run_the_requested_tasks_per_node(tmp_path):
    proc = launch("--config", TINY_CONFIG, "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "90",
                  "--dry-run", f"output_dir={tmp_path}", "optim.micro_batch=32", check=True)
    assert "#SBATCH --ntasks-per-node=2\n" in proc.stdout and "gpus" not in proc.stdout
    assert "#SBATCH --time=90\n" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes: 0: must be at least 1"),
    (["--time", "soon"], "--time: 'soon': use minutes, HH:MM:SS or D-HH:MM:SS"),
    (["--time", "2", "--signal-delay", "90"], "--signal-delay 90 s leaves less than a minute of --time 2 min"),
    (["--gpus-per-node", "-1"], "--gpus-per-node -1: must be 0"),
])
def test_bad_cluster_options_are_refused(args, message):
    proc = launch("--config", TINY_CONFIG, *args, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nope.yaml"], "config file not found"),
    (["--config", TINY_CONFIG, "optim.lr=fast"], "optim.lr: expected float, got str 'fast'"),
    (["--config", TINY_CONFIG, "--nodes", "3"], "optim.global_batch=64 is not divisible by 24 processes"),
])
def test_configs_that_do_not_resolve_are_refused(args, message):
    proc = launch(*args, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr


def test_a_run_directory_of_another_config_is_refused(tmp_path, demo_data):
    overrides = tiny_overrides(tmp_path, demo_data, "run_name=taken")
    cfg = load_config(TINY_CONFIG, overrides)
    cfg.run_dir.mkdir(parents=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    proc = launch("--config", TINY_CONFIG, "--gpus-per-node", "0", "--dry-run", *overrides, "model.size=tiny")
    assert proc.returncode == 2
    assert "holds another run whose config differs in: model.size" in proc.stderr
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["config.yaml"]


def test_a_run_with_only_damaged_checkpoints_is_refused(tmp_path, demo_data):
    overrides = tiny_overrides(tmp_path, demo_data, "run_name=ruined")
    cfg = load_config(TINY_CONFIG, overrides)
    damaged = cfg.run_dir / "checkpoints" / "step_00000004"
    damaged.mkdir(parents=True)
    (damaged / "manifest.json").write_text("{")
    save_config(cfg, cfg.run_dir / "config.yaml")
    proc = launch("--config", TINY_CONFIG, "--gpus-per-node", "0", "--dry-run", *overrides)
    assert proc.returncode == 2
    assert f"checkpoint {damaged} skipped: unreadable manifest" in proc.stderr
    assert "checkpoint.allow_fresh_start=true" in proc.stderr
    fresh = launch("--config", TINY_CONFIG, "--gpus-per-node", "0", "--dry-run", *overrides,
                   "checkpoint.allow_fresh_start=true")
    assert fresh.returncode == 0, fresh.stderr[-2000:]


def container_paths(tmp_path):
    """a run directory and a data file: the directory that holds it is mounted"""
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    (data / "train.beton").write_bytes(b"")
    mounts = f"{runs}:{runs},{data}:{data}"
    return mounts, [f"output_dir={runs}", f"data.path={data / 'train.beton'}", "data.demo=false"]


def test_pyxis_runs_every_task_in_the_image_with_the_run_and_data_mounted(tmp_path):
    mounts, overrides = container_paths(tmp_path)
    proc = launch("--config", TINY_CONFIG, "--gpus-per-node", "0", "--container-image", "docker://ghcr.io#me/smim:1",
                  "--container-mounts", "/scratch:/scratch", "--dry-run", *overrides, check=True)
    assert (f"--kill-on-bad-exit=1 '--container-image=docker://ghcr.io#me/smim:1' --container-mounts={mounts},"
            "/scratch:/scratch --container-workdir=/opt/smim_dist /opt/smim_dist/docker/entrypoint.sh python -u -m "
            f"submitit.core._submit {tmp_path}/runs/demo_cpu/slurm" in proc.stdout), proc.stdout


def test_apptainer_wraps_every_task_in_apptainer_exec(tmp_path):
    mounts, overrides = container_paths(tmp_path)
    image = tmp_path / "smim_dist.sif"
    image.write_bytes(b"")
    proc = launch("--config", TINY_CONFIG, "--nodes", "2", "--gpus-per-node", "1", "--container-image", str(image),
                  "--container-runtime", "apptainer", "--container-workdir", "/work", "--dry-run", *overrides,
                  "optim.micro_batch=32", check=True)
    assert (f"--kill-on-bad-exit=1 apptainer exec --nv --bind {mounts} --pwd /work {image} "
            "/opt/smim_dist/docker/entrypoint.sh python -u -m submitit.core._submit" in proc.stdout), proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--container-mounts", "/data:/data"], "--container-mounts /data:/data: only with --container-image IMAGE"),
    (["--container-runtime", "apptainer"], "--container-runtime apptainer: only with --container-image IMAGE"),
    (["--container-image", "missing.sif", "--container-runtime", "apptainer"],
     "--container-image missing.sif: no such file; apptainer runs a local .sif image"),
    (["--container-image", "img", "--container-mounts", "data:/data"], "'data:/data' is not SRC[:DST[:FLAGS]]"),
    (["--container-image", "img", "--container-workdir", "work"], "--container-workdir work: give an absolute path"),
    (["--container-image", "docker://ghcr.io/me/smim:1"], "separates the registry with '#'"),
    (["--container-image", "nvcr.io/me/smim:1"], "write docker://nvcr.io#me/smim:1"),
])
def test_bad_container_options_are_refused(args, message):
    proc = launch("--config", TINY_CONFIG, *args, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


HEADLINE = ["--nodes", "8", "--gpus-per-node", "8", "--config", "beit_proxy.yaml"]
"""the README's command, on a machine without the paper's data and tokenizer weights"""


def test_the_headline_dry_run_prints_the_job_and_warns_of_every_missing_file_at_once():
    proc = launch(*HEADLINE, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=8\n" in proc.stdout and "#SBATCH --gpus-per-node=8\n" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("launchers/slurm.py: warning: ")]
    assert any("target.tokenizer_path is empty" in line for line in warnings), proc.stderr
    assert any("data.path='/datasets/ffcv/in1k_train.beton' does not exist" in line for line in warnings), proc.stderr


def test_a_real_submission_refuses_every_missing_file_at_once():
    proc = launch(*HEADLINE)
    assert proc.returncode == 2 and "not submitted: " in proc.stderr
    assert "target.tokenizer_path is empty" in proc.stderr and "in1k_train.beton' does not exist" in proc.stderr


def scripts(stdout: str) -> tuple[str, str]:
    training, _, evaluation = stdout.partition("# ---- the evaluation job's sbatch script")
    return training, evaluation


def test_gpu_jobs_hold_the_node_and_run_the_setup_lines_before_their_tasks(tmp_path):
    proc = launch("--config", TINY_CONFIG, "--nodes", "2", "--exclusive", "--setup", "module load cuda/12.4",
                  "--setup", "export NCCL_SOCKET_IFNAME=ib0", "--eval-time", "45", "--dry-run",
                  f"output_dir={tmp_path}", "eval.every_epochs=4", check=True)
    training, evaluation = scripts(proc.stdout)
    for line in ("--mem=0", "--exclusive", "--requeue", "--gpus-per-node=8", "--nodes=2"):
        assert f"#SBATCH {line}\n" in training, line
    for script in (training, evaluation):
        setup = script.index("\nmodule load cuda/12.4\nexport NCCL_SOCKET_IFNAME=ib0\n")
        assert setup < script.index("\nsrun ")
    for line in ("--gpus-per-node=1", "--ntasks-per-node=1", "--nodes=1", "--time=45", "--job-name=demo_cpu-eval"):
        assert f"#SBATCH {line}\n" in evaluation, line
    assert "--exclusive" not in evaluation and "--mem=" not in evaluation and "--requeue" not in evaluation
    assert f"-m smim_dist.eval.jobs {tmp_path.absolute()}/demo_cpu/checkpoints/step_N" in evaluation
    cpu = launch("--config", TINY_CONFIG, "--gpus-per-node", "0", "--dry-run", f"output_dir={tmp_path}", check=True)
    assert "--mem" not in cpu.stdout, "CPU nodes keep the partition's default memory"


def test_every_file_the_config_reads_is_mounted_into_the_container(tmp_path):
    mounts, overrides = container_paths(tmp_path)
    weights, options = tmp_path / "weights", tmp_path / "eval_options"
    weights.mkdir()
    options.mkdir()
    (weights / "encoder.pt").write_bytes(b"")
    proc = launch("--config", TINY_CONFIG, "--gpus-per-node", "0", "--cpus-per-task", "1", "--container-image",
                  "docker://me/smim:1",
                  "--dry-run", *overrides, "model.patch_size=16", "target.kind=beit",
                  f"target.tokenizer_path={weights / 'encoder.pt'}", f"eval.config_dir={options}", check=True)
    assert f"--container-mounts={mounts},{weights}:{weights},{options}:{options} " in proc.stdout, proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert not [line for line in warnings if any(key in line for key in ("tokenizer", "data.path", "eval.config_dir"))]


def test_a_finished_run_submits_nothing(tiny_run, demo_data):
    overrides = tiny_overrides(tiny_run.parent, demo_data, "run_name=tiny", "optim.epochs=1")
    before = sorted(tiny_run.rglob("*"))
    proc = launch("--config", TINY_CONFIG, "--gpus-per-node", "0", *overrides, check=True)
    assert f"{tiny_run} already finished its 1 epochs" in proc.stdout and "nothing submitted" in proc.stdout
    assert sorted(tiny_run.rglob("*")) == before


def test_overrides_may_come_before_or_after_the_flags(tmp_path):
    proc = launch("--config", TINY_CONFIG, "run_name=mixed", "--dry-run", f"output_dir={tmp_path}", "--gpus-per-node",
                  "0", "optim.micro_batch=32", check=True)
    assert f"would train {tmp_path / 'mixed'}, global batch 64 = 32 per task x 2 accumulation x 1" in proc.stdout
