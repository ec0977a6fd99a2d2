"""What one rank pays for the epoch's sample order at LAION scale: the full permutation drawn in every rank (before)
against the Feistel order evaluated on demand (``smim_dist.data.sampler``), with a synthetic sample count (no images).

    python bench/order.py                                   # 400M and 2B samples, 64 and 512 ranks
    python bench/order.py --samples 1281167 --ranks 8       # ImageNet-1k on one node
    python bench/order.py --full-permutation-up-to 400000000   # also time the old order where it fits in memory

For each (samples, ranks) and a start at 10% and 90% of the epoch, for the last rank: seconds and peak traced bytes
(``tracemalloc``, which NumPy reports its arrays to) to get the first chunk of indices (what the image-file loader
needs to start or resume the epoch); the same for the rest of the rank's share as one array (what FFCV's loader
takes); and the balance, the largest minus the smallest share over all ranks. The global batch is micro-batch x ranks
(no accumulation).
"""

from __future__ import annotations

import argparse
import platform
import time
import tracemalloc

import numpy as np

from smim_dist.data.sampler import ResumableDistributedSampler


def measured(work):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = work()
        return result, time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def full_permutation(samples: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([0, epoch]).permutation(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[400_000_000, 2_000_000_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--full-permutation-up-to", type=int, default=0, metavar="N",
                        help="also draw the old full permutation for sample counts up to N (8N bytes)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, numpy {np.__version__}")
    print("| samples | ranks | start at | first chunk: s | first chunk: MiB | rest of the share: s | MiB "
          "| samples | largest - smallest share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for samples in args.samples:
        for ranks in args.ranks:
            samplers = [ResumableDistributedSampler(samples, args.micro_batch, 1, rank, ranks, seed=0)
                        for rank in range(ranks)]
            shares = {len(sampler) for sampler in samplers}
            last = samplers[-1]
            for fraction in (0.1, 0.9):
                last.set_epoch(1, int(fraction * last.batches_per_epoch))
                _, first_s, first_bytes = measured(lambda: next(last.index_chunks()))
                whole, whole_s, whole_bytes = measured(last.rank_indices)
                print(f"| {samples:,} | {ranks} | {fraction:.0%} | {first_s:.4f} | {first_bytes / 2**20:.1f} | "
                      f"{whole_s:.2f} | {whole_bytes / 2**20:.1f} | {len(whole):,} | {max(shares) - min(shares)} |")
    old = [n for n in args.samples if n <= args.full_permutation_up_to]
    for samples in old:
        _, seconds, peak = measured(lambda: full_permutation(samples, 1))
        print(f"before (np.random.permutation in every rank), {samples:,} samples: {seconds:.1f} s, "
              f"{peak / 2**20:,.0f} MiB per rank")


if __name__ == "__main__":
    main()
