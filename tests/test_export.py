"""``smim-export`` turns any checkpoint, ZeRO-sharded included, into a timm ViT with the encoder's exact features."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from smim_dist.config import ModelConfig
from smim_dist.engine.checkpoint import consolidated_state_dict, resolve_checkpoint
from smim_dist.export import main as smim_export
from smim_dist.models.mim import MIMModel
from smim_dist.models.timm_export import create_timm_encoder, encoder_state_dict, timm_kwargs
from smim_dist.targets.build import build_target

from conftest import engine_overrides, run_cli, tiny_overrides, train_cli


def check_export(run, out, export_output: str) -> None:
    """The exported file loads strictly into the timm model its metadata names and gives the trained encoder's
    features."""
    assert "strict=True" in export_output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["timm_kwargs"]["reg_tokens"] == 3 and meta["mode"] == "proxy"
    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(out)), strict=True)
    checkpoint, cfg = resolve_checkpoint(run)
    trained = MIMModel(cfg.model, target_dim=build_target(cfg).out_dim)
    trained.load_state_dict(consolidated_state_dict(checkpoint), strict=True)
    assert not torch.equal(trained.encoder.pos_embed, torch.zeros_like(trained.encoder.pos_embed))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = trained.eval().encoder(images)
        theirs = model.eval().forward_features(images)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_the_tiny_run_exports_to_timm_with_its_features(run_dir, tmp_path, capsys):
    out = tmp_path / "export" / "vit.safetensors"
    assert smim_export([str(run_dir), str(out)]) == 0
    check_export(run_dir, out, capsys.readouterr().out)


@pytest.mark.e2e
@pytest.mark.parametrize("nproc, stage", [(1, 0), (2, 3)])
def test_export_any_zero_stage_to_timm(tmp_path, demo_data, nproc, stage):
    name = f"z{stage}"
    train_cli(nproc, "configs/demo_cpu.yaml",
              engine_overrides(tmp_path, demo_data, f"run_name={name}", "optim.epochs=1", f"engine.zero_stage={stage}"))
    out = tmp_path / "export" / "vit.safetensors"
    check_export(tmp_path / name, out, run_cli(["-m", "smim_dist.export", str(tmp_path / name), str(out)]).stdout)


@pytest.mark.parametrize("mode", ["proxy", "vanilla"])
def test_exported_encoder_drops_pretraining_parts(mode):
    cfg = ModelConfig(size="micro", mode=mode, img_size=32, num_proxy=5)
    model = MIMModel(cfg, target_dim=10)
    state = encoder_state_dict(model.state_dict())
    assert not any(k.startswith(("recon_blocks", "head", "mask_token")) for k in state)
    timm_model = create_timm_encoder(cfg, state)
    assert timm_model.num_prefix_tokens == (5 if mode == "proxy" else 1)
    assert timm_kwargs(cfg)["reg_tokens"] == (4 if mode == "proxy" else 0)


def test_export_refuses_a_non_checkpoint(tmp_path, capsys):
    assert smim_export([str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    assert "is not a smim_dist checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("reader", ["smim-export", "smim-eval"])
def test_every_reader_refuses_a_damaged_checkpoint(run_dir, tmp_path, capsys, reader):
    """One flipped bit in the fp32 master weights: refused by name, as training refuses it, never read."""
    import shutil

    from smim_dist.eval.cli import main as smim_eval

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    checkpoint = copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text().strip()
    master = checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(master.read_bytes())
    data[len(data) // 2] ^= 0x10
    master.write_bytes(bytes(data))

    def read(path):
        if reader == "smim-export":
            return smim_export([str(path), str(tmp_path / "vit.safetensors")])
        return smim_eval(["knn", "--checkpoint", str(path)])

    assert read(checkpoint) == 2
    assert f"checkpoint {checkpoint} is damaged: {master.name} does not match its checksum" in capsys.readouterr().err
    assert read(copy) == 2
    err = capsys.readouterr().err
    assert f"{copy} has no usable checkpoint: checkpoint {checkpoint} skipped: {master.name} does not match" in err
    assert not (tmp_path / "vit.safetensors").exists() and not (copy / "eval").exists()


def test_weights_that_do_not_fit_the_config_are_refused_by_name(run_dir, tmp_path, capsys):
    import shutil

    import yaml

    from smim_dist.eval.cli import main as smim_eval

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["model"]["size"] = "tiny"
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    assert smim_eval(["knn", "--checkpoint", str(copy)]) == 2
    assert "the checkpoint's weights do not fit the run config's model (model.size=tiny" in capsys.readouterr().err


@pytest.mark.parametrize("reader", ["smim-export", "smim-eval"])
def test_a_failure_inside_the_work_is_a_crash_not_bad_input(run_dir, tmp_path, monkeypatch, reader):
    """Status 2 tells the user to fix their input; a ValueError that torch or another library raises while the work
    runs (injected here where the work reads the weights) is a crash with its traceback, not status 2."""
    import smim_dist.eval.features as features
    import smim_dist.export as export
    from smim_dist.eval.cli import main as smim_eval

    def broken(*args, **kwargs):
        raise ValueError("raised inside torch")

    monkeypatch.setattr(export, "consolidated_state_dict", broken)
    monkeypatch.setattr(features, "consolidated_state_dict", broken)
    with pytest.raises(ValueError, match="inside torch"):
        if reader == "smim-export":
            export.main([str(run_dir), str(tmp_path / "vit.safetensors")])
        else:
            smim_eval(["knn", "--checkpoint", str(run_dir), "--out", str(tmp_path / "eval")])


@pytest.mark.e2e
def test_a_run_moves_to_a_machine_without_its_training_files(tmp_path, capsys):
    """Export and evaluation need the weights and the evaluation's data, not the training machine's files: a BEiT
    run is exported and scored (on data given by override) after its tokenizer weights and its data are gone."""
    import shutil

    from test_dalle import dall_e_encoder

    from smim_dist.eval.cli import main as smim_eval

    weights, data = tmp_path / "encoder.pkl", tmp_path / "data"
    torch.manual_seed(0)
    torch.save(dall_e_encoder.Encoder(device=torch.device("cpu"), requires_grad=False), weights)
    train_cli(1, "configs/demo_cpu.yaml", tiny_overrides(
        tmp_path, data, "run_name=beit", "optim.epochs=1", "target.kind=beit", "model.patch_size=16",
        f"target.tokenizer_path={weights}", "target.trust_pickle=true"))
    weights.unlink()
    shutil.rmtree(data)
    run = tmp_path / "beit"
    assert smim_export([str(run), str(tmp_path / "vit.safetensors")]) == 0
    assert smim_eval(["knn", "--checkpoint", str(run), f"data.path={tmp_path / 'elsewhere'}"]) == 0, \
        capsys.readouterr().err
