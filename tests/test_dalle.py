"""DALL-E dVAE tokenizer: our re-implementation against OpenAI's ``dall_e`` encoder (random weights, no downloads)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smim_dist.targets.dalle import (
    DalleEncoder,
    DalleTokenizer,
    TokenizerWeightsError,
    load_dalle_encoder,
)

dall_e_encoder = pytest.importorskip("dall_e.encoder", reason="reference tests need the dall-e package (and attrs)")
dall_e_utils = pytest.importorskip("dall_e.utils")
skdata = pytest.importorskip("skimage.data")

REPO = Path(__file__).resolve().parents[1]


def _image(name: str, size: int = 112) -> torch.Tensor:
    arr = getattr(skdata, name)()[..., :3]
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.cat([_image("astronaut"), _image("chelsea")])


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    enc = dall_e_encoder.Encoder(device=torch.device("cpu"), requires_grad=False)
    enc.eval()
    return enc


@pytest.fixture(scope="module")
def reference_out(reference, images):
    with torch.no_grad():
        logits = reference(dall_e_utils.map_pixels(images))
    return logits, logits.argmax(dim=1).flatten(1)


@pytest.fixture(scope="module")
def weight_files(reference, tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("dalle")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    torch.save(state, root / "encoder.pt")
    save_file(state, str(root / "encoder.safetensors"))
    torch.save(reference, root / "encoder.pkl")  # a whole pickled module, like OpenAI's file
    return root


def _assert_same(tokenizer, images, reference_out, check_logits=False):
    ref_logits, ref_codes = reference_out
    if check_logits:
        logits = tokenizer.logits(images)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    codes = tokenizer(images)
    assert codes.dtype == torch.long
    assert codes.shape == (2, 14 * 14)
    assert torch.equal(codes, ref_codes)
    assert len(codes.unique()) > 10  # not a degenerate all-ties output


def test_state_dict_keys_and_shapes_match_dall_e(reference):
    ours = DalleEncoder().state_dict()
    theirs = reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert "blocks.input.w" in ours and "blocks.output.conv.b" in ours
    assert "blocks.group_2.block_1.id_path.w" in ours and "blocks.group_1.block_1.id_path.w" not in ours


@pytest.mark.parametrize("name", ["encoder.pt", "encoder.safetensors"])
def test_state_dict_files_match_reference(name, weight_files, images, reference_out):
    encoder = load_dalle_encoder(weight_files / name)
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    tokenizer = DalleTokenizer(encoder)
    assert tokenizer.num_codes == 8192
    _assert_same(tokenizer, images, reference_out, check_logits=name.endswith(".pt"))


def test_pickled_module_needs_trust(weight_files, images, reference_out):
    with pytest.raises(TokenizerWeightsError, match="trust_pickle"):
        load_dalle_encoder(weight_files / "encoder.pkl")
    tokenizer = DalleTokenizer.from_file(weight_files / "encoder.pkl", trust_pickle=True)
    _assert_same(tokenizer, images, reference_out)


@pytest.mark.e2e
def test_pickled_module_loads_without_dall_e(weight_files, images, reference_out, tmp_path):
    """The .pkl path remaps dall_e classes, so it works where the dall_e package (and attrs) cannot be imported."""
    torch.save(images[:1].clone(), tmp_path / "image.pt")
    script = textwrap.dedent(
        f"""
        import sys
        for mod in ("dall_e", "dall_e.encoder", "dall_e.utils", "attr"):
            sys.modules[mod] = None  # any import of these now fails
        import torch
        from smim_dist.targets.dalle import DalleTokenizer
        tok = DalleTokenizer.from_file({str(weight_files / "encoder.pkl")!r}, trust_pickle=True)
        assert not any(m.startswith("dall_e") and sys.modules[m] is not None for m in sys.modules)
        codes = tok(torch.load({str(tmp_path / "image.pt")!r}))
        torch.save(codes, {str(tmp_path / "codes.pt")!r})
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.load(tmp_path / "codes.pt"), reference_out[1][:1])


def test_wrapped_state_dict_legacy_and_pickled_pt(reference, weight_files, tmp_path):
    state = reference.state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pth")
    loaded = load_dalle_encoder(tmp_path / "wrapped.pth").state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save(reference, tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)  # pre-1.6 file format
    loaded = load_dalle_encoder(tmp_path / "legacy.pkl", trust_pickle=True).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save(reference, tmp_path / "module.pt")  # a pickled module under a .pt name
    with pytest.raises(TokenizerWeightsError, match="trust_pickle"):
        load_dalle_encoder(tmp_path / "module.pt")
    loaded = load_dalle_encoder(tmp_path / "module.pt", trust_pickle=True).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_autocast_and_frozen(weight_files, images, reference_out):
    tokenizer = DalleTokenizer.from_file(weight_files / "encoder.safetensors")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tokenizer.logits(images[:1])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_out[0][:1], rtol=1e-5, atol=1e-5)

    parent = nn.Module()
    parent.tokenizer = tokenizer
    parent.head = nn.Linear(2, 2)
    parent.train()
    assert parent.head.training and not tokenizer.training and not tokenizer.encoder.training
    assert not any(m.training for m in tokenizer.modules())
    assert not any(p.requires_grad for p in tokenizer.parameters())


def _dall_e_gpu_branch(conv, x):
    """dall_e's ``Conv2d.forward`` as it runs on a CUDA device (its device test is the only thing left out), so the
    original's float16 computation can be reproduced on the CPU."""
    if conv.use_float16:
        x, w, b = x.half(), conv.w.half(), conv.b.half()
    else:
        x, w, b = x.float(), conv.w, conv.b
    return F.conv2d(x, w, b, padding=(conv.kw - 1) // 2)


def test_fp16_convolutions_reproduce_the_original_on_gpu(monkeypatch, images):
    torch.manual_seed(1)
    small = dall_e_encoder.Encoder(n_hid=64, vocab_size=512, device=torch.device("cpu"), requires_grad=False).eval()
    ours = DalleEncoder(n_hid=64, vocab_size=512).eval()
    ours.load_state_dict(small.state_dict())
    pixels = dall_e_utils.map_pixels(images)
    with torch.no_grad():
        fp32_logits = ours(pixels)
        monkeypatch.setattr(dall_e_utils.Conv2d, "forward", _dall_e_gpu_branch)
        original_logits = small(pixels)
        fp16_logits = ours(pixels, conv_dtype=torch.float16)
    assert original_logits.dtype == fp16_logits.dtype == torch.float32
    torch.testing.assert_close(fp16_logits, original_logits, rtol=0, atol=0)
    assert not torch.equal(fp16_logits, fp32_logits), "the float16 setting must change the arithmetic"


def test_tokenizer_precision_follows_config_and_device(weight_files):
    from smim_dist.config import Config
    from smim_dist.targets.build import build_target

    cfg = Config()
    cfg.target.kind, cfg.target.tokenizer_path = "beit", str(weight_files / "encoder.safetensors")
    tokenizer = build_target(cfg).generator
    assert tokenizer.conv_dtype(torch.device("cuda")) == torch.float16
    assert tokenizer.conv_dtype(torch.device("cpu")) == torch.float32
    cfg.target.tokenizer_fp16 = False
    assert build_target(cfg).generator.conv_dtype(torch.device("cuda")) == torch.float32


def test_missing_weights_are_explained(tmp_path):
    for path in (None, ""):
        with pytest.raises(TokenizerWeightsError) as err:
            load_dalle_encoder(path)
        msg = str(err.value)
        assert "target.tokenizer_path" in msg and "encoder.pkl" in msg and "trust_pickle" in msg
        assert "https://cdn.openai.com/dall-e/encoder.pkl" in msg
    missing = tmp_path / "nowhere" / "encoder.pkl"
    with pytest.raises(TokenizerWeightsError, match="nowhere"):
        load_dalle_encoder(missing, trust_pickle=True)
    assert issubclass(TokenizerWeightsError, ValueError)


def test_other_model_is_rejected(tmp_path):
    torch.save(nn.Linear(4, 3).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(TokenizerWeightsError, match="not a DALL-E") as err:
        load_dalle_encoder(tmp_path / "linear.pt")
    msg = str(err.value)
    assert "blocks.input.w" in msg and "weight" in msg

    bad = DalleEncoder(n_hid=64, vocab_size=512).state_dict()
    torch.save(bad, tmp_path / "small.pt")
    with pytest.raises(TokenizerWeightsError, match="shape"):
        load_dalle_encoder(tmp_path / "small.pt")

    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(TokenizerWeightsError, match="unsupported"):
        load_dalle_encoder(tmp_path / "weights.npz")


def test_image_size_must_be_divisible_by_8():
    tokenizer = DalleTokenizer(DalleEncoder(n_hid=64, vocab_size=512))
    assert tokenizer(torch.rand(1, 3, 16, 24)).shape == (1, 2 * 3)
    with pytest.raises(ValueError, match="100x112"):
        tokenizer(torch.rand(1, 3, 100, 112))
    with pytest.raises(ValueError):
        tokenizer(torch.rand(1, 1, 16, 16))
