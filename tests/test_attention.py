"""Attention analyses: mean attention distance and entropy on hand-built attention, the weights recomputed from qkv
against timm's own (fused) attention output, ``smim-eval attention`` end to end on a tiny pre-training checkpoint, and
refusal of bad input before any compute."""

import json
import math

import pytest
import torch
from PIL import Image
from timm.layers import Attention
from torch import Tensor, nn

from smim_dist.config import ModelConfig
from smim_dist.eval.attention import (attention_modules, attention_weights, captured_attention,
                                      mean_attention_distance, patch_distances, patch_entropy)
from smim_dist.eval.cli import main
from smim_dist.models.timm_export import create_timm_encoder


TAG = "step_00000004"
"""one epoch of the tiny config: 64 images / global batch 16"""


def test_mean_distance_of_hand_built_attention():
    """A 2x2 grid of 16 px patches behind one prefix token: self-attention is 0 px away; uniform attention averages
    0, 16, 16 and 16 sqrt 2; attention on the opposite corner is 16 sqrt 2; attention to the prefix token is left
    out."""
    distances = patch_distances((2, 2), 16)
    assert distances[0].tolist() == [0.0, 16.0, 16.0, 16 * math.sqrt(2)]
    on_self = torch.zeros(1, 1, 5, 5)
    on_self[0, 0, 0, 0] = 1
    on_self[0, 0, 1:, 1:] = torch.eye(4)
    uniform = torch.full((1, 1, 5, 5), 1 / 5)
    prefix_heavy = torch.cat([torch.full((1, 1, 5, 1), 0.9), torch.full((1, 1, 5, 4), 0.025)], dim=-1)
    opposite = torch.zeros(1, 1, 5, 5)
    opposite[0, 0, 1:, 1:] = torch.eye(4).flip(0)
    weights = torch.cat([on_self, uniform, prefix_heavy, opposite], dim=1)  # 4 heads of one image
    expected = [0.0, 16 * (2 + math.sqrt(2)) / 4, 16 * (2 + math.sqrt(2)) / 4, 16 * math.sqrt(2)]
    torch.testing.assert_close(mean_attention_distance(weights, 1, distances),
                               torch.tensor([expected], dtype=torch.float64))


def test_entropy_is_zero_on_one_patch_and_log_p_when_uniform():
    maps = torch.tensor([[0.0, 0.3, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    torch.testing.assert_close(patch_entropy(maps), torch.tensor([0.0, math.log(4)]))


def _output_from_weights(attn: Attention, x: Tensor, weights: Tensor) -> Tensor:
    """The attention module's output rebuilt from the given weights and the module's own v and projection."""
    batch, tokens, _ = x.shape
    v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, -1))


@pytest.mark.parametrize("mode", ["proxy", "vanilla"])
def test_weights_rebuild_every_blocks_fused_attention_output(mode):
    torch.manual_seed(0)
    encoder = create_timm_encoder(ModelConfig(size="micro", mode=mode, img_size=32, patch_size=8, num_proxy=4)).eval()
    modules = attention_modules(encoder)
    assert all(attn.fused_attn for attn in modules)
    seen: list[tuple[Tensor, Tensor]] = []
    handles = [attn.register_forward_hook(lambda _m, inputs, output: seen.append((inputs[0], output)))
               for attn in modules]
    with torch.no_grad(), captured_attention(encoder) as weights:
        encoder.forward_features(torch.randn(2, 3, 32, 32))
    for handle in handles:
        handle.remove()
    tokens = 16 + (4 if mode == "proxy" else 1)
    assert [w.shape for w in weights] == [(2, 3, tokens, tokens)] * 4
    for attn, w, (x, output) in zip(modules, weights, seen):
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        torch.testing.assert_close(_output_from_weights(attn, x, w), output)


def test_weights_respect_qk_norm():
    torch.manual_seed(1)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
        x = torch.randn(2, 7, 32)
        torch.testing.assert_close(_output_from_weights(attn, x, attention_weights(attn, attn.qkv(x))), attn(x))


def test_attention_cli_writes_json_and_figures(run_dir):
    assert main(["attention", "--checkpoint", str(run_dir), "--images", "6"]) == 0
    out = run_dir / "eval" / TAG / "attention"
    results = json.loads((out / "attention.json").read_text())
    assert (results["tag"], results["step"], results["mode"], results["images"]) == (TAG, 4, "proxy", 6)
    assert (results["layer"], results["query"], results["grid"]) == (3, [2, 2], [4, 4])
    assert results["prefix_tokens"] == ["proxy0", "proxy1", "proxy2", "proxy3"]
    distances = results["mean_distance_px"]
    assert len(distances) == 4 and all(len(row) == 3 for row in distances)
    assert all(0 < d < 32 * math.sqrt(2) for row in distances for d in row)
    assert len(results["prefix_mean"]) == 4
    for token in results["prefix_mean"]:
        assert len(token["map"]) == 4 and all(len(row) == 4 for row in token["map"])
        assert 0 < token["patch_mass"] <= 1 + 1e-6
        assert 0 <= token["mean_entropy"] <= token["entropy_of_mean"] + 1e-6 <= results["max_entropy"] + 2e-6
    assert len(results["shown"]) == 4
    for shown in results["shown"]:
        assert len(shown["query"]) == 4 and len(shown["prefix"]) == 4
        assert 0 < sum(map(sum, shown["query"])) <= 1 + 1e-5
    assert set(results["figures"]) == {f"{kind}_{s['index']}.png" for kind in ("query", "prefix")
                                       for s in results["shown"]} | {"prefix_mean.png", "mean_distance.png"}
    for name in results["figures"]:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
    entry = json.loads((run_dir / "eval" / TAG / "results.json").read_text())["protocols"]["attention"]
    assert entry["mean_distance_px"] == pytest.approx([sum(row) / 3 for row in distances], abs=1e-4)
    assert entry["prefix_entropy"] == pytest.approx(
        {token["token"]: token["mean_entropy"] / results["max_entropy"] for token in results["prefix_mean"]}, abs=1e-6)
    assert (entry["layer"], entry["images"], entry["figures"]) == (3, 6, str(out))


def _refused(capsys, *argv: str) -> str:
    assert main(["attention", *argv]) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_any_compute(run_dir, tmp_path, capsys):
    checkpoint = str(run_dir / "checkpoints" / TAG)
    assert "--images 0" in _refused(capsys, "--checkpoint", checkpoint, "--images", "0", "--out", str(tmp_path))
    assert "--layer 4" in _refused(capsys, "--checkpoint", checkpoint, "--layer", "4", "--out", str(tmp_path))
    assert "--layer -1" in _refused(capsys, "--checkpoint", checkpoint, "--layer", "-1", "--out", str(tmp_path))
    assert "4x4" in _refused(capsys, "--checkpoint", checkpoint, "--query", "1,4", "--out", str(tmp_path))
    assert "16 val images" in _refused(capsys, "--checkpoint", checkpoint, "--images", "17", "--out", str(tmp_path))
    assert "is not a smim_dist checkpoint" in _refused(capsys, "--checkpoint", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["attention", "--checkpoint", checkpoint, "--query", "centre"])
    assert exit_info.value.code == 2 and "ROW,COL" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
