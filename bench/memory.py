"""Memory a training step needs and moves, counted rather than timed (the counts are the same on any machine).

    python bench/memory.py                                  # ViT-B/16 at 224 px, bf16, 4 images, scaled to 256
    python bench/memory.py --size micro --img 32 --patch 8  # seconds, for a quick look

For vanilla and proxy models it prints (1) the activations autograd keeps for the backward (``saved_tensors_hooks``,
each storage once, parameters excluded), per image and scaled to ``--scale-to`` images: what a per-GPU micro-batch
costs in memory; (2) the bytes written by the step's non-matmul operators (elementwise, norms, reductions, copies;
views excluded) in one forward + backward, with this project's residuals and with timm's ``LayerScale`` + ``DropPath``
modules side by side: on a GPU these operators are memory-bound, so their bytes are their time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time
from unittest import mock

import torch
from timm.layers import DropPath
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from smim_dist.config import ModelConfig
from smim_dist.models.layers import _ResidualMlp
from smim_dist.models.mim import MIMModel
from step import make_batch

MATMULS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward")
NOT_WRITES = ("detach", "t", "_unsafe_view", "split", "split_with_sizes", "unbind", "empty", "empty_strided",
              "new_empty", "new_empty_strided")


def timm_residual(block: _ResidualMlp, x, branch, layer_scale):
    """The residual as timm's modules compute it: scale, drop, add, each a pass over ``[B, T, D]``."""
    return x + DropPath(block.drop_path).train(block.training)(branch if layer_scale is None else layer_scale(branch))


class WrittenBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if not func.is_view and name not in NOT_WRITES and name not in MATMULS and "attention" not in name:
            tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.by_op[name] += sum(t.numel() * t.element_size() for t in tensors)
            self.calls += 1
        return out


def saved_activation_bytes(model, images, mask) -> int:
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images, mask)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def written_bytes(model, images, mask) -> WrittenBytes:
    with WrittenBytes() as counter:
        step(model, images, mask)
    return counter


def step(model, images, mask) -> None:
    model.zero_grad(set_to_none=True)
    model(images, mask).float().square().mean().backward()


def median_step_ms(model, images, mask, rounds: int) -> dict[str, float]:
    """Both residuals timed alternately in this process (3 steps a round): the time side of the byte count."""
    variants = {"ours": contextlib.nullcontext,
                "timm": lambda: mock.patch.object(_ResidualMlp, "_residual", timm_residual)}
    times = {name: [] for name in variants}
    for _ in range(rounds + 1):
        for name, patched in variants.items():
            with patched():
                start = time.perf_counter()
                for _ in range(3):
                    step(model, images, mask)
                times[name].append((time.perf_counter() - start) / 3 * 1e3)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--scale-to", type=int, default=256, help="per-GPU micro-batch to scale the activations to")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--time-rounds", type=int, default=0,
                        help="also time a forward + backward with each residual, alternating, this many rounds")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batch = make_batch(args, torch.device("cpu"))
    images, mask = batch.images.to(dtype), batch.mask
    mib = 2**20 * args.batch
    print(f"ViT-{args.size}/{args.patch} at {args.img} px, {args.dtype} weights, batch {args.batch}, mask ratio "
          f"{args.mask_ratio} (vanilla and proxy alike), drop path {args.drop_path}, layer scale 0.1")
    for mode in ("vanilla", "proxy"):
        torch.manual_seed(0)
        cfg = ModelConfig(size=args.size, mode=mode, img_size=args.img, patch_size=args.patch,
                          drop_path=args.drop_path, layer_scale_init=0.1)
        model = MIMModel(cfg, 108).to(dtype).train()
        saved = saved_activation_bytes(model, images, mask)
        print(f"{mode}: activations kept for the backward {saved / mib:.1f} MiB/image, "
              f"{saved / args.batch * args.scale_to / 2**30:.1f} GiB at {args.scale_to} images")
        counts = {"this project's residuals": written_bytes(model, images, mask)}
        with mock.patch.object(_ResidualMlp, "_residual", timm_residual):
            counts["timm's LayerScale + DropPath"] = written_bytes(model, images, mask)
        for label, counter in counts.items():
            top = ", ".join(f"{op} {size / mib:.1f}" for op, size in counter.by_op.most_common(4))
            print(f"  {label}: non-matmul operators write {sum(counter.by_op.values()) / mib:.1f} MiB/image in "
                  f"{counter.calls} calls ({top})")
        ours, theirs = (sum(counter.by_op.values()) for counter in counts.values())
        print(f"  bytes written, this project's / timm's: {ours / theirs:.3f}")
        if args.time_rounds:
            ms = median_step_ms(model, images, mask, args.time_rounds)
            print(f"  forward + backward on this machine: {ms['ours']:.1f} ms with this project's residuals, "
                  f"{ms['timm']:.1f} ms with timm's, ratio {ms['ours'] / ms['timm']:.3f} "
                  f"(median of {args.time_rounds})")


if __name__ == "__main__":
    main()
