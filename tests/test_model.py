"""The pre-training models do what the paper's equations say, on a micro ViT."""

import math

import pytest
import torch
from timm.layers import DropPath
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from smim_dist.config import ModelConfig
from smim_dist.loss import gather_masked, image_blind_loss, mim_loss
from smim_dist.data.masking import RandomMaskGenerator
from smim_dist.models.flops import appendix_c_block_macs, forward_flops
from smim_dist.models.layers import Block
from smim_dist.models.mask_index import MaskIndices
from smim_dist.models.mim import MIMModel

IMG = 64  # 4x4 patches of 16 px


def make(mode, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(size="micro", mode=mode, img_size=IMG, num_proxy=4, **{"drop_path": 0.0, **kw})
    return MIMModel(cfg, target_dim=12).eval()


def random_mask(batch=2, ratio=0.5, seed=0):
    gen = RandomMaskGenerator((IMG // 16, IMG // 16), round(ratio * (IMG // 16) ** 2))
    return MaskIndices.from_bool(torch.stack([torch.from_numpy(gen.mask_for(seed, 0, i)) for i in range(batch)]))


def capture_block_outputs(model, images, mask):
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0].clone())) for b in model.encoder.blocks]
    prediction = model(images, mask)
    for hook in hooks:
        hook.remove()
    return prediction, outputs


def test_prediction_shape_and_counts():
    images, mask = torch.randn(2, 3, IMG, IMG), random_mask(ratio=0.75)
    for mode in ("proxy", "vanilla"):
        assert make(mode)(images, mask).shape == (2, 12, 12)


def outputs_before_and_after_changing_the_mask_embedding(mode):
    model, images, mask = make(mode), torch.randn(2, 3, IMG, IMG), random_mask()
    before = capture_block_outputs(model, images, mask)
    with torch.no_grad():
        model.mask_token.add_(torch.randn_like(model.mask_token))
    return model, mask, before, capture_block_outputs(model, images, mask)


def test_proxy_img_and_proxy_tokens_ignore_everything_about_mask_tokens():
    _, _, (pred_a, blocks_a), (pred_b, blocks_b) = outputs_before_and_after_changing_the_mask_embedding("proxy")
    for a, b in zip(blocks_a, blocks_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(pred_a, pred_b), "the [MASK] embedding must change the reconstruction"


def test_vanilla_visible_tokens_do_see_mask_tokens():
    model, mask, (_, blocks_a), (_, blocks_b) = outputs_before_and_after_changing_the_mask_embedding("vanilla")
    prefix = model.encoder.num_prefix
    visible = mask.visible + prefix
    a = torch.gather(blocks_a[0], 1, visible.unsqueeze(-1).expand(-1, -1, blocks_a[0].shape[-1]))
    b = torch.gather(blocks_b[0], 1, visible.unsqueeze(-1).expand(-1, -1, blocks_b[0].shape[-1]))
    assert not torch.allclose(a, b)


def test_masked_pixels_never_reach_the_prediction():
    images, mask = torch.randn(2, 3, IMG, IMG), random_mask()
    changed = images.clone()
    grid_w = IMG // 16
    for row, patch in enumerate(mask.masked[0].tolist()):
        r, c = divmod(patch, grid_w)
        changed[0, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = torch.randn(3, 16, 16)
    for mode in ("proxy", "vanilla"):
        model = make(mode)
        torch.testing.assert_close(model(images, mask), model(changed, mask))


def test_reconstruction_depends_on_the_visible_image():
    images, mask = torch.randn(2, 3, IMG, IMG), random_mask()
    for mode in ("proxy", "vanilla"):
        model = make(mode)
        assert not torch.allclose(model(images, mask), model(images.flip(-1), mask))


def zero_prefix_after_each_block(model):
    prefix = model.encoder.num_prefix

    def hook(module, inputs, output):
        x = output[0].clone()
        x[:, :prefix] = 0
        return (x, output[1])

    return [b.register_forward_hook(hook) for b in model.encoder.blocks]


def test_proxy_mask_tokens_learn_about_the_image_only_through_proxies():
    images, mask = torch.randn(2, 3, IMG, IMG), random_mask()
    proxy, vanilla = make("proxy"), make("vanilla")
    for model in (proxy, vanilla):
        zero_prefix_after_each_block(model)
    torch.testing.assert_close(proxy(images, mask), proxy(torch.randn_like(images), mask))
    assert not torch.allclose(vanilla(images, mask), vanilla(torch.randn_like(images), mask)), "vanilla's direct path"


def test_recon_attention_reads_only_proxy_and_mask_tokens():
    model, images, mask = make("proxy"), torch.randn(2, 3, IMG, IMG), random_mask(ratio=0.75)
    fused = model(images, mask)
    explicit, attn = model(images, mask, return_attention=True)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
    heads = model.encoder.blocks[0].attn.num_heads
    assert [tuple(a.shape) for a in attn["blocks"]] == [(2, heads, 4 + 4, 4 + 4)] * 4
    assert [tuple(a.shape) for a in attn["recon"]] == [(2, heads, 12, 4 + 12)] * 4
    for probs in attn["blocks"] + attn["recon"]:
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_beit_init_rescales_residual_outputs_in_both_stacks():
    torch.manual_seed(0)
    model = MIMModel(ModelConfig(size="tiny", mode="proxy", img_size=32), target_dim=8)
    for stack in (model.encoder.blocks, model.recon_blocks):
        first, last = stack[0].mlp.fc2.weight.std(), stack[-1].mlp.fc2.weight.std()
        assert abs(first / last - (2 * 12 / 2) ** 0.5) < 0.15 * (12 ** 0.5)
        assert abs(stack[0].attn.proj.weight.std() / 0.02 * 2 ** 0.5 - 1) < 0.1


def test_the_maskfeat_init_is_a_plain_vit_and_the_beit_mlps_are_xavier():
    torch.manual_seed(0)
    plain = MIMModel(ModelConfig(size="tiny", mode="proxy", img_size=32, rescale_init=False), target_dim=8)
    for stack in (plain.encoder.blocks, plain.recon_blocks):
        for block in (stack[0], stack[-1]):
            for linear in (block.mlp.fc2, block.attn.proj):
                assert abs(linear.weight.std() / 0.02 - 1) < 0.05
    xavier = MIMModel(ModelConfig(size="tiny", mode="proxy", img_size=32, mlp_init="xavier"), target_dim=8)
    fc1 = xavier.encoder.blocks[0].mlp.fc1
    bound = math.sqrt(6 / (fc1.in_features + fc1.out_features))
    assert fc1.weight.abs().max() <= bound and fc1.weight.abs().max() > 0.95 * bound
    assert 0 < fc1.bias.abs().max() < 1e-5
    last_fc2 = xavier.encoder.blocks[-1].mlp.fc2
    assert last_fc2.weight.abs().max() <= math.sqrt(6 / (last_fc2.in_features + last_fc2.out_features)) / math.sqrt(24)


def test_weight_decay_reaches_the_tokens_a_recipe_names_only():
    from smim_dist.engine.deepspeed_setup import param_groups

    model = make("proxy")
    names = {id(param): name for name, param in model.named_parameters()}

    def decayed(tokens):
        group = next(g for g in param_groups(model, 0.05, tokens) if g["weight_decay"])
        return sorted(names[id(param)] for param in group["params"] if names[id(param)].endswith(("token", "embed")))

    assert decayed(()) == []
    by_decay = {group["weight_decay"]: group["params"] for group in param_groups(model, 0.05)}
    assert sorted(by_decay) == [0.0, 0.05] and sum(map(len, by_decay.values())) == len(names)
    assert all(param.ndim >= 2 for param in by_decay[0.05]), "norms and biases are never decayed"
    assert all(param.ndim <= 1 or names[id(param)].endswith(("token", "embed")) for param in by_decay[0.0])
    assert decayed(("mask_token",)) == ["mask_token"]
    assert decayed(("cls_token", "reg_token", "pos_embed")) == ["encoder.cls_token", "encoder.pos_embed",
                                                                "encoder.reg_token"]


@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_gradient_checkpointing_matches_plain_backward(drop_path):
    """The recomputed forward replays the drop-path draws of the first one."""
    images, mask = torch.randn(4, 3, IMG, IMG), random_mask(batch=4)
    grads = []
    for flag in (False, True):
        model = make("proxy", grad_checkpointing=flag, drop_path=drop_path).train()
        torch.manual_seed(1)
        model(images, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("layer_scale_init", [0.1, None])
@pytest.mark.parametrize("drop_path, training", [(0.5, True), (0.5, False), (0.0, True)])
def test_residuals_are_timms_layer_scale_and_drop_path(layer_scale_init, drop_path, training):
    """The blocks fold stochastic depth and layer scale into one multiply; timm's modules, same seed, same result."""
    block = Block(32, 4, 4.0, True, layer_scale_init, drop_path).train(training)
    x, branch = torch.randn(16, 5, 32, requires_grad=True), torch.randn(16, 5, 32, requires_grad=True)
    results = []
    for residual in (lambda: block._residual(x, branch, block.ls1),
                     lambda: x + DropPath(drop_path).train(training)(block.ls1(branch) if block.ls1 else branch)):
        torch.manual_seed(0)
        out = residual()
        grads = torch.autograd.grad(out.square().sum(), [x, branch, *block.parameters()], allow_unused=True)
        results.append((out, [g for g in grads if g is not None]))
    torch.testing.assert_close(results[0], results[1])
    dropped = (results[0][0] == x).all(-1).all(-1)
    assert dropped.any() == (training and drop_path > 0) and not dropped.all()


def test_any_size_divisible_by_patch():
    cfg = ModelConfig(size="micro", mode="proxy", img_size=48, patch_size=8, num_proxy=2)
    model = MIMModel(cfg, target_dim=3).eval()
    gen = RandomMaskGenerator((6, 6), 20)
    mask = MaskIndices.from_bool(torch.from_numpy(gen.mask_for(0, 0, 0))[None])
    assert model(torch.randn(1, 3, 48, 48), mask).shape == (1, 20, 3)


@pytest.mark.parametrize("bad, match", [
    (dict(img_size=70), "not divisible by patch size 16"),
    (dict(mode="proxy", num_proxy=0), "num_proxy=0"),
])
def test_bad_model_config(bad, match):
    cfg = ModelConfig(**{"size": "micro", **bad})
    with pytest.raises(ValueError, match=match):
        MIMModel(cfg, target_dim=4)


def test_bad_masks_and_images():
    model = make("proxy")
    images = torch.randn(2, 3, IMG, IMG)
    with pytest.raises(ValueError, match="boolean"):
        MaskIndices.from_bool(torch.zeros(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="same number of masked"):
        MaskIndices.from_bool(torch.tensor([[True] * 3 + [False] * 13, [True] * 4 + [False] * 12]))
    with pytest.raises(ValueError, match="at least one patch must be visible"):
        MaskIndices.from_bool(torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="covers 25 patches"):
        model(images, MaskIndices.from_bool(torch.arange(25).repeat(2, 1) < 5))
    with pytest.raises(ValueError, match=r"\[batch, 3, 64, 64\]"):
        model(torch.randn(2, 3, 80, 80), random_mask())


def test_paper_flops_ratios_from_appendix_c():
    proxy, vanilla = ModelConfig(size="base", mode="proxy"), ModelConfig(size="base", mode="vanilla")
    train = appendix_c_block_macs(proxy, 0.6, True) / appendix_c_block_macs(vanilla, 0.6, True) - 1
    infer = appendix_c_block_macs(proxy, 0.6, False) / appendix_c_block_macs(vanilla, 0.6, False) - 1
    assert round(train * 100, 1) == -2.8
    assert round(infer * 100, 1) == 3.7


@pytest.mark.parametrize("mode", ["proxy", "vanilla"])
@pytest.mark.parametrize("training", [True, False])
def test_flop_model_matches_flop_counter(mode, training):
    model = make(mode)
    cfg = ModelConfig(size="micro", mode=mode, img_size=IMG, num_proxy=4)
    images = torch.randn(1, 3, IMG, IMG)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        if training:
            model(images, random_mask(batch=1, ratio=0.75))
        else:
            model.encoder(images)
    assert counter.get_total_flops() == forward_flops(cfg, 0.75, training, target_dim=12)


def test_losses_cover_masked_patches_only():
    per_patch = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    masked = torch.tensor([[1, 4], [0, 5]])
    picked = gather_masked(per_patch, masked)
    torch.testing.assert_close(picked, torch.stack([per_patch[0, [1, 4]], per_patch[1, [0, 5]]]))
    assert mim_loss(picked.clone(), picked) == 0
    assert mim_loss(picked + 2, picked) == pytest.approx(4.0)
    codes = torch.tensor([[3, 1], [0, 2]])
    logits = torch.nn.functional.one_hot(codes, 4).float() * 50
    assert mim_loss(logits, codes) < 1e-6
    assert mim_loss(logits, codes.flip(-1)) > 10


def test_image_blind_loss_is_the_predict_the_mean_level():
    target = torch.randn(4, 5, 3) * 2 + 1
    blind = image_blind_loss(torch.zeros(4, 5, 3), target)
    torch.testing.assert_close(blind, mim_loss(target.mean(dim=(0, 1)).expand_as(target), target))
    codes = torch.arange(8).repeat(4, 1)
    assert image_blind_loss(torch.zeros(4, 8, 16), codes) == pytest.approx(math.log(8))


@pytest.mark.parametrize("mode", ["proxy", "vanilla"])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_compiled_training_step_is_one_graph_that_never_recompiles(mode, grad_checkpointing):
    """``engine.compile`` pays off on a GPU only if the whole forward (and with it the backward) is one graph: a graph
    break splits the fusion and adds launches, a recompile stalls a step. Two steps with new masks and drop-path
    draws run through ``fullgraph=True`` with recompiles made errors, and match eager. AOTAutograd traces the backward
    as inductor would; its code generation is left out (it adds a minute on this CPU and changes no graph)."""
    eager = make(mode, grad_checkpointing=grad_checkpointing, drop_path=0.3).train()
    compiled = torch.compile(make(mode, grad_checkpointing=grad_checkpointing, drop_path=0.3).train(),
                             backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(2):
            images, mask = torch.randn(4, 3, IMG, IMG), random_mask(batch=4, seed=step)
            results = []
            for model in (eager, compiled):
                torch.manual_seed(step)
                prediction = model(images, mask)
                prediction.square().mean().backward()
                results.append(prediction)
            torch.testing.assert_close(results[1], results[0])
    for (name, param), twin in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(twin.grad, param.grad, msg=name)


def test_the_pixel_target_standardises_each_patch_or_keeps_its_colour():
    from smim_dist.targets.pixels import PixelTarget

    images = torch.zeros(1, 3, 16, 16)
    images[:, :, :8, :8] = 2.0  # a flat patch
    images[:, 0, 8:, 8:] = torch.arange(64, dtype=torch.float32).view(8, 8)  # a ramp in one channel
    per_patch, raw = PixelTarget(8)(images), PixelTarget(8, per_patch=False)(images)
    assert raw.shape == per_patch.shape == (1, 4, 192)
    assert torch.equal(raw[0, 0], torch.full((192,), 2.0)), "a flat patch keeps its colour"
    assert per_patch[0, 0].abs().max() == 0 and torch.allclose(per_patch[0, 3].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(per_patch[0, 3].var(), torch.tensor(1.0), atol=1e-4)
