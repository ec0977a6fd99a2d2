"""The real ``smim-train`` CLI: single process, DeepSpeed ZeRO on 2 gloo processes, the NaN guard, bad input."""

import collections
import gzip
import importlib.util
import json
import signal

import pytest
import torch
from deepspeed.accelerator import get_accelerator

from conftest import REPO, engine_overrides, losses, tiny_overrides, train_cli, train_with_faults
from smim_dist.config import ConfigError, load_config
from smim_dist.engine.stop_signals import STOP_SIGNALS
from smim_dist.models.flops import forward_flops
from smim_dist.vit_sizes import vit_size
from smim_dist.targets.build import build_target
from smim_dist.train import main as smim_train
from smim_dist.train import train

TINY_CONFIG = "configs/demo_cpu.yaml"


def snapshot(directory):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_zero_stages_on_two_processes_match_one_process(tmp_path, demo_data):
    """Losses match; so do the gradient norms of DeepSpeed's ZeRO 3 and of AdamW's hook, which under ZeRO 2 sums both
    ranks' partitions and under ZeRO 0 (one process or two) takes the already averaged gradients as they are."""
    base = engine_overrides(tmp_path, demo_data)
    train_cli(1, TINY_CONFIG, [*base, "run_name=single", "engine.zero_stage=0"])
    reference = losses(tmp_path / "single")
    assert sorted(reference) == list(range(1, 9)), "2 epochs x 4 steps, logged every step"
    norms = {}
    for stage in (0, 2, 3):
        name = f"zero{stage}"
        train_cli(2, TINY_CONFIG, [*base, f"run_name={name}", f"engine.zero_stage={stage}"])
        got, norms[stage] = losses(tmp_path / name), losses(tmp_path / name, "grad_norm")
        assert got.keys() == reference.keys()
        for step, loss in reference.items():
            assert got[step] == pytest.approx(loss, rel=2e-4), f"ZeRO-{stage} step {step}"
    single_norms = losses(tmp_path / "single", "grad_norm")
    for step, norm in norms[3].items():
        for label, got in (("ZeRO-2", norms[2]), ("ZeRO-0", norms[0]), ("one process", single_norms)):
            assert got[step] == pytest.approx(norm, rel=1e-3), f"{label}, step {step}"


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 2])
def test_overlapped_all_reduce_trains_as_the_one_after_the_backward(tmp_path, demo_data, stage):
    """``engine.overlap_comm`` reduces buckets of a quarter of the model during the backward, here on 2 processes
    with 2 accumulation micro-steps (ZeRO 1 reduces at the last one only, ZeRO 2 at each)."""
    base = engine_overrides(tmp_path, demo_data, f"engine.zero_stage={stage}", "optim.micro_batch=4")
    curves = {}
    for overlap in (False, True):
        name = f"overlap_{overlap}"
        train_cli(2, TINY_CONFIG, [*base, f"run_name={name}", f"engine.overlap_comm={str(overlap).lower()}"])
        curves[overlap] = losses(tmp_path / name), losses(tmp_path / name, "grad_norm")
    for plain, overlapped in zip(curves[False], curves[True]):
        assert plain.keys() == overlapped.keys() and len(plain) == 8
        for step, value in plain.items():
            assert overlapped[step] == pytest.approx(value, rel=1e-5), f"step {step}"


@pytest.mark.e2e
def test_nan_on_one_rank_skips_that_step_on_all_ranks(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=nan")
    train_with_faults(2, ["--nan-calls", "2,3"], overrides)
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9)), "every step is taken, the skipped ones included"
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2, 2, 2], "steps 3 and 4 had rank 0's NaNs"
    assert all(r["loss"] == r["loss"] for r in records), "no NaN reached the logged loss"


@pytest.mark.e2e
def test_a_slow_loader_on_one_rank_is_named_in_the_log(tmp_path, demo_data):
    """Rank 1's loader sleeps before each batch; rank 0 then waits in the collectives, not for data, so only the
    gathered per-rank figures can show which loader holds the run back."""
    overrides = engine_overrides(tmp_path, demo_data, "run_name=slow", "log.every_steps=2")
    run = train_with_faults(2, ["--slow-loader-rank", "1", "--loader-delay", "0.5"], overrides)
    records = [json.loads(line) for line in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert all(record["peak_mem_mb"] > 0 for record in records)
    for record in records[1:]:  # the first window holds every rank's loader start-up too (and rank 0's wandb's)
        assert record["data_wait_max_rank"] == 1, record
        slow_rank = record["data_wait_frac_max"]
        other_rank = 2 * record["data_wait_frac"] - slow_rank
        assert slow_rank > 0.5 and other_rank < slow_rank / 2, record  # ratios, not times: CI's speed varies 2x
    assert "on rank 1)" in run.stderr


@pytest.mark.e2e
def test_repeated_nan_stops_and_keeps_last_good_checkpoint(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=diverge", "engine.max_bad_steps=3",
                                 "checkpoint.every_epochs=1")
    proc = train_with_faults(1, ["--nan-calls", "9+"], overrides, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss" in proc.stderr and "engine.max_bad_steps=3" in proc.stderr
    checkpoints = tmp_path / "diverge" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_00000004"]


@pytest.mark.e2e
def test_a_diverged_run_never_checkpoints_its_weights(tmp_path, demo_data):
    """lr 1e30: the first update leaves huge but finite weights, every later loss is not finite; no checkpoint of
    them is written, and the run ends with status 3 rather than 0."""
    overrides = engine_overrides(tmp_path, demo_data, "run_name=huge", "optim.lr=1e30", "optim.warmup_epochs=0",
                                 "checkpoint.every_epochs=1")
    proc = train_cli(1, TINY_CONFIG, overrides, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "checkpoint at step 4 not written: the last step's loss was not finite" in proc.stderr
    assert "no checkpoint is its last good one" in proc.stderr
    assert not (tmp_path / "huge" / "checkpoints").exists() or not any((tmp_path / "huge" / "checkpoints").iterdir())


@pytest.mark.e2e
def test_a_non_finite_optimizer_moment_is_never_checkpointed(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=moment", "checkpoint.every_epochs=1",
                                 "engine.zero_stage=1")
    proc = train_with_faults(1, ["--poison-moment-after", "6"], overrides, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "checkpoint at step 8 not written: some weights or optimizer moments are not finite" in proc.stderr
    assert "step_00000004 is its last good one" in proc.stderr
    checkpoints = tmp_path / "moment" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_00000004"]


@pytest.mark.e2e
def test_bad_steps_between_two_host_reads_are_still_caught(tmp_path, demo_data):
    """With a read every 4 steps, steps 5-6 are skipped and 7-8 recover before the read at step 8: still 2 in a row."""
    overrides = engine_overrides(tmp_path, demo_data, "run_name=between", "engine.max_bad_steps=2",
                                 "engine.check_every_steps=4", "log.every_steps=4")
    proc = train_with_faults(1, ["--nan-calls", "8,10"], overrides, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "2 steps in a row had a non-finite loss (engine.max_bad_steps=2) by step 8" in proc.stderr


@pytest.mark.e2e
def test_demo_config_end_to_end(tmp_path, demo_data):
    overrides = [f"output_dir={tmp_path}", f"data.path={tmp_path / 'data'}", "data.demo_images=256", "optim.epochs=3",
                 "optim.global_batch=32", "optim.micro_batch=32", "log.every_steps=4", "checkpoint.every_epochs=3"]
    proc = train_cli(1, TINY_CONFIG, overrides)
    run = tmp_path / "demo_cpu"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    for key in ("loss", "image_blind_loss", "lr", "grad_norm", "images_per_s", "data_wait_frac", "data_wait_frac_max",
                "data_wait_max_rank", "step_time_s", "peak_mem_mb", "skipped_steps", "epoch",
                "model_tflops_per_device"):
        assert all(r[key] is not None for r in records), key
    cfg = load_config(str(run / "config.yaml"))
    flops_per_image = 3 * forward_flops(cfg.model, cfg.mask.ratio, True, build_target(cfg).out_dim)
    for record in records:
        assert record["model_tflops_per_device"] == pytest.approx(flops_per_image * record["images_per_s"] / 1e12)
        assert record["mfu"] is None, "no datasheet peak for a CPU: utilisation unknown, not guessed"
    assert records[-1]["loss"] < 0.9 * records[0]["loss"], [r["loss"] for r in records]
    assert records[-1]["loss"] < 0.9 * records[-1]["image_blind_loss"], "learned more than the average target"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000024"
    assert (run / "config.yaml").read_text().startswith("# config hash ")
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run directory"
    assert "run " in proc.stderr and "ZeRO-1 fp32" in proc.stderr and "image-blind" in proc.stderr


@pytest.mark.e2e
def test_rerun_with_other_config_refuses_and_changes_nothing(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=taken", "optim.epochs=1")
    train_cli(1, TINY_CONFIG, overrides)
    before = snapshot(tmp_path / "taken")
    proc = train_cli(1, TINY_CONFIG, [*overrides, "optim.lr=0.1"], check=False)
    assert proc.returncode == 2
    assert "optim.lr: 0.0015 -> 0.1" in proc.stderr and "Pick a new run_name" in proc.stderr
    assert snapshot(tmp_path / "taken") == before


@pytest.mark.e2e
def test_unsupported_precision_names_what_is_supported(tmp_path, demo_data):
    accelerator = get_accelerator()
    supported = {"bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    missing = [name for name, ok in supported.items() if not ok]
    if not missing:
        pytest.skip("this device supports every precision")
    proc = train_cli(1, TINY_CONFIG, engine_overrides(tmp_path, demo_data, f"engine.precision={missing[0]}"),
                     check=False)
    assert proc.returncode == 2
    assert f"engine.precision={missing[0]} is not supported" in proc.stderr and "supported here: fp32" in proc.stderr
    assert not (tmp_path / "demo_cpu").exists()


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nope.yaml"], "config file not found"),
    (["--config", TINY_CONFIG, "optim.micro_batch=0"], "optim.micro_batch=0: both must be at least 1"),
    (["--config", TINY_CONFIG, "optim.lr=fast"], "optim.lr: expected float, got str 'fast'"),
    (["--config", TINY_CONFIG, "log.wandb_mode=online"], "no wandb key was found"),
])
def test_bad_cli_input_fails_before_work(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}  # smim-train installs its own first thing
    try:
        assert smim_train(args) == 2
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert message in capsys.readouterr().err


def test_local_launcher_refuses_batch_that_does_not_split(capsys):
    spec = importlib.util.spec_from_file_location("local_launcher", REPO / "launchers" / "local.py")
    local_launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_launcher)
    assert local_launcher.main(["--nproc", "3", "--config", TINY_CONFIG]) == 2
    assert "optim.global_batch=64 is not divisible by 3 processes" in capsys.readouterr().err


@pytest.mark.e2e
def test_beit_target_trains_end_to_end(tmp_path, demo_data):
    from smim_dist.targets.dalle import DalleEncoder

    weights = tmp_path / "dalle_encoder.pt"
    torch.save(DalleEncoder().state_dict(), weights)
    overrides = engine_overrides(tmp_path, demo_data, "run_name=beit", "target.kind=beit",
                                 f"target.tokenizer_path={weights}", "model.patch_size=16", "optim.epochs=1")
    train_cli(1, TINY_CONFIG, overrides)
    got = losses(tmp_path / "beit")
    assert len(got) == 4 and all(7.0 < loss < 10.0 for loss in got.values()), "cross-entropy over 8192 codes"


@pytest.mark.e2e
def test_corrupt_images_are_skipped_and_counted(tmp_path, demo_data):
    from PIL import Image

    tree = tmp_path / "imagenet" / "train"
    for index in range(40):
        folder = tree / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.effect_noise((48, 40), 60 + index).convert("RGB").save(folder / f"{index:03d}.jpg")
    (tree / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tree / "class1" / "empty.png").write_bytes(b"")
    overrides = tiny_overrides(tmp_path, demo_data, "run_name=corrupt", "data.demo=false", "data.source=imagefolder",
                               f"data.path={tmp_path / 'imagenet'}", "optim.epochs=2")
    train_cli(1, TINY_CONFIG, overrides)
    records = [json.loads(line) for line in (tmp_path / "corrupt" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and records[-1]["corrupt_images"] >= 1
    assert all(r["loss"] == r["loss"] for r in records)


@pytest.mark.e2e
def test_crashed_run_resumes_exactly_and_continues_the_wandb_run(tmp_path, demo_data):
    common = ["checkpoint.every_epochs=1", "log.wandb_mode=offline"]
    train_cli(1, TINY_CONFIG, engine_overrides(tmp_path, demo_data, "run_name=straight", *common))
    overrides = engine_overrides(tmp_path, demo_data, "run_name=crashed", *common, "engine.max_bad_steps=1")
    crash = train_with_faults(1, ["--nan-calls", "8"], overrides, check=False)
    assert crash.returncode == 3
    run = tmp_path / "crashed"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    resumed = train_cli(1, TINY_CONFIG, overrides)
    assert "resumed from step_00000004" in resumed.stderr
    assert losses(run) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    wandb_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb_run_id").read_text().strip()
    assert len(wandb_runs) == 2 and all(name.endswith(run_id) for name in wandb_runs)


@pytest.mark.e2e
def test_compiled_model_trains_like_eager(tmp_path, demo_data):
    for name, flag in (("eager", "false"), ("compiled", "true")):
        train_cli(1, TINY_CONFIG, engine_overrides(tmp_path, demo_data, f"run_name={name}", "optim.epochs=1",
                                                   f"engine.compile={flag}"))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


@pytest.mark.e2e
def test_profiled_steps_leave_a_trace_on_every_rank_and_train_the_same(tmp_path, demo_data):
    """Steps 3-6 of 8 (across the epoch boundary) traced on 2 ranks: each rank's trace holds those steps and the
    model's operators, and the losses are an unprofiled run's."""
    train_cli(1, TINY_CONFIG, engine_overrides(tmp_path, demo_data, "run_name=plain"))
    run = train_cli(2, TINY_CONFIG, engine_overrides(tmp_path, demo_data, "run_name=profiled", "log.profile_steps=4",
                                                     "log.profile_from_step=3"))
    assert losses(tmp_path / "profiled") == pytest.approx(losses(tmp_path / "plain"), rel=2e-4)
    profile = tmp_path / "profiled" / "profile"
    assert f"profile: rank 0's trace {profile / 'rank00000_steps3-6.json.gz'}" in run.stderr
    for rank in (0, 1):
        trace = json.loads(gzip.decompress((profile / f"rank{rank:05d}_steps3-6.json.gz").read_bytes()))
        names = collections.Counter(event.get("name") for event in trace["traceEvents"])
        assert [name for name in names if name.startswith("step ")] == ["step 3", "step 4", "step 5", "step 6"]
        attentions = 4 * 2 * vit_size("micro").depth  # 4 steps of one micro-batch, each block and its twin
        assert names["aten::_scaled_dot_product_flash_attention_for_cpu"] == attentions
        table = (profile / f"rank{rank:05d}_steps3-6.txt").read_text()
        assert "Self CPU" in table and "aten::mm" in table


@pytest.mark.e2e
def test_a_profile_window_cut_by_a_stop_is_written_and_the_resumed_run_traces_the_rest(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=cut", "log.profile_steps=4", "log.profile_from_step=3")
    train_with_faults(1, ["--stop-after", "4"], overrides)
    train_cli(1, TINY_CONFIG, overrides)
    traces = sorted(path.name for path in (tmp_path / "cut" / "profile").glob("*.json.gz"))
    assert traces == ["rank00000_steps3-4.json.gz", "rank00000_steps5-6.json.gz"]


@pytest.mark.e2e
def test_old_checkpoints_are_pruned_except_milestones(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=prune", "optim.epochs=3", "checkpoint.every_epochs=1",
                                 "checkpoint.keep_last=1", "checkpoint.keep_every_epochs=2", "log.every_steps=4")
    train_cli(1, TINY_CONFIG, overrides)
    checkpoints = tmp_path / "prune" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_00000008", "step_00000012"]
    assert json.loads((checkpoints / "step_00000008" / "meta.json").read_text())["epoch"] == 2


@pytest.mark.e2e
@pytest.mark.parametrize("source, nproc", [("ffcv", 2), ("imagefolder", 1), ("webdataset", 1), ("webdataset", 2)])
def test_mid_epoch_resume_after_a_skipped_step_is_exact(tmp_path, demo_data, source, nproc):
    """A NaN skips step 2; a run stopped at step 5, inside epoch 2, and resumed must give the uninterrupted loss
    curve, skipped-step count and weights' trajectory. (FFCV on one process: tests/container stops the demo mid-epoch
    and resumes it to the same losses.)"""
    common = ["checkpoint.every_epochs=1", f"data.source={source}", f"optim.micro_batch={8 // nproc}",
              "data.shuffle_buffer=16"]
    straight = tiny_overrides(tmp_path, demo_data, "run_name=one_skip", *common)
    train_with_faults(nproc, ["--nan-calls", "3"], straight)
    checkpoints = tmp_path / "one_skip" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_00000004", "step_00000008"]
    stopped = tiny_overrides(tmp_path, demo_data, "run_name=stopped", *common)
    train_with_faults(nproc, ["--nan-calls", "3", "--stop-after", "5"], stopped)
    latest = (tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((tmp_path / "stopped" / "checkpoints" / latest / "meta.json").read_text())
    assert (latest, meta["batch_in_epoch"], meta["skipped"]) == ("step_00000005", 2, 1), "1 step into epoch 2"
    train_cli(nproc, TINY_CONFIG, stopped)
    assert losses(tmp_path / "stopped") == pytest.approx(losses(tmp_path / "one_skip"), rel=1e-6)
    records = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 1


def test_webdataset_spec_without_shards_is_refused(tmp_path, demo_data, process_group):
    overrides = tiny_overrides(tmp_path, demo_data, "data.demo=false", "data.source=webdataset",
                               f"data.path={tmp_path}/x-{{0..3}}.tar",
                               "data.samples_per_epoch=64")
    with pytest.raises(ConfigError, match="4 of 4 shards do not exist"):
        train(load_config(TINY_CONFIG, overrides), process_group)


@pytest.mark.e2e
def test_a_truncated_checkpoint_is_reported_and_the_previous_one_resumed(tmp_path, demo_data):
    overrides = engine_overrides(tmp_path, demo_data, "run_name=damaged", "checkpoint.every_epochs=1")
    train_cli(1, TINY_CONFIG, overrides)
    run = tmp_path / "damaged"
    reference = losses(run)
    newest = run / "checkpoints" / "step_00000008"
    largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])  # a node died mid-write
    resumed = train_cli(1, TINY_CONFIG, overrides)
    assert f"checkpoint {newest} skipped: {largest.relative_to(newest)} has" in resumed.stderr
    assert "resumed from step_00000004" in resumed.stderr
    assert losses(run) == pytest.approx(reference, rel=1e-6), "epoch 2 retrained exactly"


def test_overrides_may_surround_the_flags():
    from smim_dist.train import parse_args

    args = parse_args(["optim.lr=2e-3", "--config", TINY_CONFIG, "run_name=a", "--local-rank", "1", "optim.epochs=2"])
    assert (args.config, args.overrides, args.local_rank) == (TINY_CONFIG, ["optim.lr=2e-3", "run_name=a",
                                                                            "optim.epochs=2"], 1)


@pytest.mark.e2e
def test_a_resume_that_changes_harmless_settings_saves_them_and_records_the_change(tmp_path, demo_data):
    """Evaluation jobs read the saved config while retention reads the live one: a setting changed on resume (here
    the log interval and the checkpoints kept) must reach the saved config, with a record of when it changed."""
    overrides = engine_overrides(tmp_path, demo_data, "run_name=changed", "optim.epochs=1")
    train_cli(1, TINY_CONFIG, overrides)
    run = tmp_path / "changed"
    changed = [*overrides, "log.every_steps=2", "checkpoint.keep_last=7"]
    train_cli(1, TINY_CONFIG, changed)
    saved = load_config(run / "config.yaml")
    assert (saved.log.every_steps, saved.checkpoint.keep_last) == (2, 7)
    records = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert [record["changes"] for record in records] == [["checkpoint.keep_last: 3 -> 7", "log.every_steps: 1 -> 2"]]
    train_cli(1, TINY_CONFIG, changed)
    assert len((run / "config_changes.jsonl").read_text().splitlines()) == 1, "an unchanged start records nothing"
