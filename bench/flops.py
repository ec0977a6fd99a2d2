"""Per-image forward FLOPs of SemanticMIM vs vanilla MIM, by the paper's appendix-C model and by exact count.

    python bench/flops.py --size base --mask-ratio 0.6 --num-proxy 8
"""

from __future__ import annotations

import argparse

from smim_dist.config import ModelConfig
from smim_dist.models.flops import appendix_c_block_macs, forward_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--num-proxy", type=int, default=8)
    args = parser.parse_args()
    proxy = ModelConfig(size=args.size, mode="proxy", img_size=args.img, num_proxy=args.num_proxy)
    vanilla = ModelConfig(size=args.size, mode="vanilla", img_size=args.img)
    print(f"ViT-{args.size}/16 at {args.img}px, {args.num_proxy} proxies, mask ratio {args.mask_ratio}")
    print(f"{'':28s}{'appendix C (paper)':>20s}{'exact (this code)':>20s}")
    for label, training in (("pre-training", True), ("inference", False)):
        paper = appendix_c_block_macs(proxy, args.mask_ratio, training) / appendix_c_block_macs(
            vanilla, args.mask_ratio, training) - 1
        exact = forward_flops(proxy, args.mask_ratio, training) / forward_flops(vanilla, args.mask_ratio, training) - 1
        print(f"{label + ', proxy vs vanilla':28s}{100 * paper:+19.1f}%{100 * exact:+19.1f}%")
    for mode, cfg in (("vanilla", vanilla), ("proxy", proxy)):
        print(f"  {mode:8s} pre-training {forward_flops(cfg, args.mask_ratio, True) / 1e9:6.2f} GFLOPs/image, "
              f"inference {forward_flops(cfg, args.mask_ratio, False) / 1e9:6.2f} GFLOPs/image")


if __name__ == "__main__":
    main()
