"""``smim-train`` with injected faults: a target that turns non-finite on chosen calls of chosen ranks, a stop
request after a number of optimizer steps, as a preemption signal would make, a slow loader on one rank, and an
infinite AdamW moment after a chosen optimizer step (the weights stay finite: that parameter stops moving).

    python tests/scripts/train_with_faults.py [--nan-calls 4,5] [--nan-ranks 0] [--stop-after 6] \
        [--slow-loader-rank 1 --loader-delay 0.2] [--poison-moment-after 2] --config ... overrides

``--nan-calls`` may end in "+" ("5+") to poison every call from there on.
"""

import argparse
import itertools
import os
import sys
import time

from smim_dist import train
from smim_dist.targets.build import build_target

parser = argparse.ArgumentParser(allow_abbrev=False)
parser.add_argument("--nan-calls", default="", help="comma list of target calls (0-based) to poison")
parser.add_argument("--nan-ranks", default="0", help="comma list of ranks whose target is poisoned")
parser.add_argument("--stop-after", type=int, help="request a stop after this many optimizer steps")
parser.add_argument("--slow-loader-rank", type=int, help="the rank whose loader sleeps before every batch")
parser.add_argument("--loader-delay", type=float, default=0.0, help="seconds that loader sleeps per batch")
parser.add_argument("--poison-moment-after", type=int, help="make rank 0's first exp_avg_sq infinite after this step")
faults, cli_args = parser.parse_known_args()
ranks = {int(r) for r in faults.nan_ranks.split(",")}
open_ended = faults.nan_calls.endswith("+")
poisoned_calls = {int(c) for c in faults.nan_calls.rstrip("+").split(",") if c}
real_train = train.train
real_build_loader = train.build_pretrain_loader
real_build_engine = train.build_engine


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


class SlowLoader:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            time.sleep(faults.loader_delay)
            yield batch


def slowed_loader(cfg, rank, *args):
    loader, sampler = real_build_loader(cfg, rank, *args)
    return (SlowLoader(loader) if rank == faults.slow_loader_rank else loader), sampler


def engine_with_a_poisoned_moment(*args, **kwargs):
    from smim_dist.engine.deepspeed_setup import fused_adamw

    engine = real_build_engine(*args, **kwargs)
    real_step = engine.step

    def step():
        real_step()
        if engine.global_steps == faults.poison_moment_after and int(os.environ.get("RANK", 0)) == 0:
            optimizer = fused_adamw(engine)
            optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg_sq"].fill_(float("inf"))

    engine.step = step
    return engine


train.build_target = poisoned_target
if faults.poison_moment_after is not None:
    train.build_engine = engine_with_a_poisoned_moment
train.build_pretrain_loader = slowed_loader
if faults.stop_after is not None:
    train.train = train_until_stop
sys.exit(train.main(cli_args))
