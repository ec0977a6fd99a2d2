"""``smim-train`` with injected faults: a target that turns non-finite on chosen calls of chosen ranks, and a stop
request after a number of optimizer steps, as a preemption signal would make.

    python tests/scripts/train_with_faults.py [--nan-calls 4,5] [--nan-ranks 0] [--stop-after 6] --config ... overrides

``--nan-calls`` may end in "+" ("5+") to poison every call from there on.
"""

import argparse
import itertools
import os
import sys

from smim_dist import train
from smim_dist.targets.build import build_target

parser = argparse.ArgumentParser(allow_abbrev=False)
parser.add_argument("--nan-calls", default="", help="comma list of target calls (0-based) to poison")
parser.add_argument("--nan-ranks", default="0", help="comma list of ranks whose target is poisoned")
parser.add_argument("--stop-after", type=int, help="request a stop after this many optimizer steps")
faults, cli_args = parser.parse_known_args()
ranks = {int(r) for r in faults.nan_ranks.split(",")}
open_ended = faults.nan_calls.endswith("+")
poisoned_calls = {int(c) for c in faults.nan_calls.rstrip("+").split(",") if c}
real_train = train.train


def poisoned_target(cfg):
    target = build_target(cfg)
    clean_forward, counter = target.forward, {"calls": 0}

    def forward(images, tokenizer_images=None):
        out = clean_forward(images, tokenizer_images)
        call = counter["calls"]
        counter["calls"] += 1
        hit = call in poisoned_calls or (open_ended and call >= min(poisoned_calls))
        return out * float("nan") if hit and int(os.environ.get("RANK", 0)) in ranks else out

    target.forward = forward
    return target


def train_until_stop(cfg, dist_info, stop_requested, *args, **kwargs):
    """The loop asks once after each optimizer step."""
    steps = itertools.count(1)
    return real_train(cfg, dist_info, lambda: next(steps) >= faults.stop_after, *args, **kwargs)


train.build_target = poisoned_target
if faults.stop_after is not None:
    train.train = train_until_stop
sys.exit(train.main(cli_args))
