"""Config loading: base chains, overrides, strict validation with useful messages; the LR schedule."""

import math

import pytest
import yaml

from smim_dist.config import Config, ConfigError, config_from_dict, load_config, save_config
from smim_dist.engine.run_dir import config_changes
from smim_dist.data.masking import build_mask_generator
from smim_dist.engine.schedule import cosine_lr
from smim_dist.preflight import refuse_missing_files
from smim_dist.vit_sizes import image_grid

from conftest import REPO


def write(path, text):
    path.write_text(text)
    return path


def test_paper_configs_carry_table_2(tmp_path):
    beton = write(tmp_path / "in1k_train.beton", "")
    data = [f"data.path={beton}"]
    maskfeat = load_config(REPO / "configs/maskfeat_proxy.yaml", data)
    assert (maskfeat.model.size, maskfeat.model.mode, maskfeat.model.num_proxy) == ("base", "proxy", 8)
    assert (maskfeat.mask.kind, maskfeat.mask.ratio) == ("random", 0.6)
    assert (maskfeat.optim.lr, maskfeat.optim.min_lr, maskfeat.optim.warmup_epochs) == (1.6e-3, 1e-6, 30)
    assert (maskfeat.optim.clip_grad, maskfeat.data.crop_scale, maskfeat.optim.global_batch) == (0.02, (0.5, 1.0), 2048)
    assert (maskfeat.model.drop_path, maskfeat.model.layer_scale_init, maskfeat.model.rescale_init,
            maskfeat.model.mlp_init) == (0.0, None, False, "trunc_normal"), "the authors' plain ViT"
    assert maskfeat.optim.decayed_tokens == ("cls_token", "reg_token", "pos_embed")
    vanilla = load_config(REPO / "configs/maskfeat_vanilla.yaml", data)
    assert (vanilla.model.mode, vanilla.mask.ratio, vanilla.model.num_prefix) == ("vanilla", 0.4, 1)
    assert vanilla.mask.kind == "random", "Sec. 4.3: random patch masking for the baselines too"
    weights = write(tmp_path / "encoder.pt", "")
    beit = load_config(REPO / "configs/beit_proxy.yaml", [*data, f"target.tokenizer_path={weights}"])
    assert (beit.optim.lr, beit.optim.min_lr, beit.optim.warmup_epochs, beit.optim.clip_grad) == (1.5e-3, 1e-5, 10, 3.0)
    assert (beit.data.crop_scale, beit.data.color_jitter, beit.optim.betas) == ((0.08, 1.0), 0.4, (0.9, 0.999))
    assert (beit.model.drop_path, beit.model.layer_scale_init, beit.model.rescale_init, beit.model.mlp_init,
            beit.optim.decayed_tokens) == (0.1, 0.1, True, "xavier", ("mask_token",))
    beit_vanilla = load_config(REPO / "configs/beit_vanilla.yaml", [*data, f"target.tokenizer_path={weights}"])
    assert (beit_vanilla.mask.kind, beit_vanilla.mask.ratio) == ("random", 0.4)


def test_base_chain_and_overrides(tmp_path):
    write(tmp_path / "root.yaml", "optim:\n  lr: 0.1\n  epochs: 7\n  warmup_epochs: 1\nmodel:\n  size: small\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\noptim:\n  lr: 0.2\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "base: mid.yaml\nrun_name: leaf\n")
    cfg = load_config(leaf, ["optim.epochs=9", "model.layer_scale_init=null", "optim.betas=[0.9,0.95]"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.model.size, cfg.run_name) == (0.2, 9, "small", "leaf")
    assert cfg.model.layer_scale_init is None and cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("written, expected", [
    ("2e-3", 2e-3), ("1E-4", 1e-4), (".5", 0.5), ("1_000", 1000.0), ("+3e+2", 300.0), ("0.0015", 0.0015)])
def test_numbers_are_read_as_people_write_them_in_files_and_overrides(tmp_path, written, expected):
    """YAML 1.1 reads 2e-3 and 1E-4 as strings; a float field takes them as numbers, in a file and as an override."""
    from_file = load_config(write(tmp_path / "c.yaml", f"optim:\n  lr: {written}\n  min_lr: 0\n"))
    from_override = load_config(None, [f"optim.lr={written}", "optim.min_lr=0"])
    assert from_file.optim.lr == from_override.optim.lr == expected
    assert type(from_file.optim.lr) is float


def test_whole_numbers_in_any_notation_fill_int_fields_and_fractions_do_not():
    cfg = load_config(None, ["optim.global_batch=1_024", "optim.epochs=3e2", "optim.micro_batch=32"])
    assert (cfg.optim.global_batch, cfg.optim.epochs) == (1024, 300) and type(cfg.optim.epochs) is int
    with pytest.raises(ConfigError, match="optim.epochs: expected int, got str '1.5e0'"):
        load_config(None, ["optim.epochs=1.5e0"])
    assert load_config(None, ["run_name=2e-3"]).run_name == "2e-3", "a text field keeps the text"


@pytest.mark.parametrize("text, overrides, message", [
    ("optim:\n  lrr: 0.1\n", [], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("modle:\n  size: base\n", [], "unknown key 'modle'; did you mean 'model'?"),
    ("optim:\n  epochs: ten\n", [], "optim.epochs: expected int, got str 'ten'"),
    ("", ["optim.epochs"], "not of the form key.sub=value"),
    ("", ["optim.epoch=3"], "did you mean 'optim.epochs'?"),
    ("", ["model.size=huge"], "model.size='huge' is not one of"),
    ("", ["model.mode=proxi"], "did you mean 'proxy'?"),
    ("", ["mask.ratio=1.0"], "mask.ratio=1.0 masks 196 of 196 patches"),
    ("", ["mask.ratio=0.0"], "masks 0 of 196"),
    ("", ["mask.ratio=0.999"], "masks 196 of 196"),
    ("", ["model.img_size=200"], "image size 200x200 is not divisible by patch size 16"),
    ("", ["model.num_proxy=0"], "model.num_proxy=0"),
    ("", ["optim.micro_batch=0"], "optim.micro_batch=0: both must be at least 1"),
    ("", ["engine.zero_stage=4"], "engine.zero_stage=4"),
    ("", ["engine.overlap_comm=true", "engine.zero_stage=3"], "engine.overlap_comm=true with engine.zero_stage=3"),
    ("", ["engine.overlap_comm=true", "engine.zero_stage=0"], "ZeRO 0 reduces after the backward"),
    ("", ["log.profile_steps=-1"], "log.profile_steps=-1, log.profile_from_step=20"),
    ("", ["log.profile_steps=5", "log.profile_from_step=0"], "log.profile_from_step=0: trace"),
    ("", ["data.path=/data/in1k.beton"], "set data.demo=false to read it"),
    ("", ["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be 0 or more"),
    ("", ["optim.clip_grad=-1"], "optim.clip_grad=-1.0 must be 0 (no clipping) or more"),
    ("", ["optim.eps=0"], "optim.eps=0.0 must be above 0"),
    ("", ["optim.lr=.inf"], "optim.lr: expected a finite number, got inf"),
    ("", ["mask.ratio=.nan"], "mask.ratio: expected a finite number, got nan"),
    ("", ["optim.betas=[1.5,0.9]"], "optim.betas=[1.5, 0.9] must be two values in [0, 1)"),
    ("", ["seed=-1"], "seed=-1 must be 0 to 2**31 - 1"),
    ("", ["model.patch_size=0"], "patch size 0: both must be at least 1"),
    ("", ["data.hflip=2"], "data.hflip=2.0 must be a probability"),
    ("", ["data.color_jitter=-0.4"], "data.color_jitter=-0.4 must be 0 (off) or more"),
    ("", ["data.crop_ratio=[1.3,0.7]"], "data.crop_ratio=[1.3, 0.7] must be [min, max] with 0 < min <= max"),
    ("", ["data.num_workers=-1"], "data.num_workers=-1 must be 0"),
    ("", ["data.demo_images=0"], "data.demo_images=0 must be at least one global batch (2048)"),
    ("", ["optim=5"], "optim must be a mapping, got 5"),
    ("base: 5\n", [], "base: 5 must be a file name or a list of them"),
])
def test_errors_name_the_file_key_and_fix(tmp_path, text, overrides, message):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=None) as err:
        load_config(path, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["target.kind=beit"], "target.tokenizer_path"),
    (["data.demo=false", "data.source=imagefolder", "data.path=/nonexistent"], "has no train/ folder"),
    (["data.demo=false", "data.path=/nonexistent.beton"], "does not exist; data.source=ffcv reads a .beton"),
    (["eval.config_dir=/nonexistent"], "eval.config_dir=/nonexistent: no such folder"),
    (["data.source=webdataset", "data.shard_counts=/nonexistent.json"], "data.shard_counts='/nonexistent.json' is not"),
])
def test_files_this_machine_lacks_are_refused_where_the_run_reads_them_not_at_load(overrides, message):
    """A saved run is exported or evaluated on machines without its data or tokenizer: loading checks the schema,
    the preflight the files."""
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        refuse_missing_files(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize("kind", ["random", "block"])
@pytest.mark.parametrize("img_size, ratio", [(64, 0.6), (64, 0.9), (96, 0.3), (96, 0.5), (224, 0.05), (224, 0.4)])
def test_config_accepts_exactly_the_masks_the_generator_can_draw(kind, img_size, ratio):
    """The config checks masks without the numba generators (login nodes); the two must not drift apart."""
    overrides = [f"mask.kind={kind}", f"model.img_size={img_size}", f"mask.ratio={ratio}"]
    try:
        build_mask_generator(kind, image_grid(img_size, 16), ratio)
        drawable = True
    except ValueError:
        drawable = False
    try:
        load_config(None, overrides)
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == drawable


def test_unknown_key_error_names_the_file(tmp_path):
    path = write(tmp_path / "typo.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_missing_base_and_missing_file(tmp_path):
    path = write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml \(named as base by .*c.yaml\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_shipped_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    """`launchers/slurm.py --config beit_proxy.yaml`, as users type it, from wherever they are."""
    monkeypatch.chdir(tmp_path)
    reference = load_config(REPO / "configs/demo_cpu.yaml").to_dict()
    for name in ("demo_cpu.yaml", "demo_cpu", "configs/demo_cpu.yaml"):
        assert load_config(name).to_dict() == reference, name
    write(tmp_path / "demo_cpu.yaml", "base: " + str(REPO / "configs/demo_cpu.yaml") + "\nseed: 7\n")
    assert load_config("demo_cpu.yaml").seed == 7, "a file in the working directory comes first"
    with pytest.raises(ConfigError, match="the shipped configs: beit_proxy.yaml, beit_vanilla.yaml, demo_cpu.yaml"):
        load_config("beit_prox.yaml")


def test_base_loop_is_refused(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_saved_config_round_trips_with_its_hash(tmp_path):
    cfg = load_config(REPO / "configs/demo_cpu.yaml", ["optim.lr=0.002"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert text.splitlines()[0] == f"# config hash {cfg.hash()}"
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config(REPO / "configs/demo_cpu.yaml").hash() != cfg.hash()
    assert Config().hash() == Config().hash()


def test_a_run_saved_before_engine_tf32_existed_resumes_and_may_toggle_it_and_overlap_comm():
    """TF32 and the all-reduce's bucketing change roundings, not the recipe: an older run (neither ``engine.tf32`` nor
    ``engine.overlap_comm`` in its saved config) resumes under any setting of either, while a real change is still
    named."""
    saved = Config().to_dict()
    del saved["engine"]["tf32"], saved["engine"]["overlap_comm"]
    assert config_changes(saved, Config().to_dict()) == []
    toggled = load_config(None, ["engine.tf32=false", "engine.overlap_comm=true"]).to_dict()
    assert config_changes(Config().to_dict(), toggled) == []
    assert config_changes(saved, load_config(None, ["engine.precision=fp32"]).to_dict()) == [
        "engine.precision: 'bf16' -> 'fp32'"]


def test_micro_batch_is_the_largest_split_under_the_cap():
    """One config on any world size that divides the global batch: the paper's 2048 with at most 256 per rank."""
    optim = load_config(REPO / "configs/demo_cpu.yaml", ["optim.global_batch=2048", "optim.micro_batch=256"]).optim
    split = {world: (optim.micro_batch_size(world), optim.accumulation_steps(world)) for world in (1, 2, 8, 16, 64)}
    assert split == {1: (256, 8), 2: (256, 4), 8: (256, 1), 16: (128, 1), 64: (32, 1)}
    optim.micro_batch = 96
    assert (optim.micro_batch_size(1), optim.accumulation_steps(1)) == (64, 32)
    optim.global_batch = 96
    assert (optim.micro_batch_size(1), optim.accumulation_steps(1)) == (96, 1)
    assert (optim.micro_batch_size(4), optim.accumulation_steps(4)) == (24, 1)
    optim.micro_batch = 40
    assert (optim.micro_batch_size(1), optim.accumulation_steps(1)) == (32, 3)
    with pytest.raises(ConfigError, match="optim.global_batch=96 is not divisible by 5 processes"):
        optim.accumulation_steps(5)


def test_cosine_schedule_values():
    peak, floor = 1.5e-3, 1e-5
    assert cosine_lr(0, 1000, 100, peak, floor) == 0.0
    assert cosine_lr(50, 1000, 100, peak, floor) == pytest.approx(peak / 2)
    assert cosine_lr(100, 1000, 100, peak, floor) == pytest.approx(peak)
    assert cosine_lr(550, 1000, 100, peak, floor) == pytest.approx(floor + (peak - floor) / 2)
    assert cosine_lr(1000, 1000, 100, peak, floor) == pytest.approx(floor)
    assert cosine_lr(5000, 1000, 100, peak, floor) == pytest.approx(floor)
    quarter = cosine_lr(325, 1000, 100, peak, floor)
    assert quarter == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    values = [cosine_lr(s, 1000, 100, peak, floor) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:])), "monotone after warmup"


def test_block_masking_that_cannot_fit_is_a_config_error():
    with pytest.raises(ConfigError, match=r"mask.kind=block.*fewer than one block \(16 patches"):
        load_config(REPO / "configs/demo_cpu.yaml", ["model.img_size=32", "mask.kind=block", "mask.ratio=0.4"])


def test_a_binary_file_is_refused_as_a_config(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a YAML text file"):
        load_config(binary)
