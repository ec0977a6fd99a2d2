"""Faults injected into ``smim-train``: a target that turns non-finite on chosen calls of chosen ranks, a stop
request after a number of optimizer steps, as a preemption signal would make, a slow loader on one rank, and an
infinite AdamW moment after a chosen optimizer step (the weights stay finite: that parameter stops moving).

The faults are flags, ``[--nan-calls 4,5] [--nan-ranks 0] [--stop-after 6] [--slow-loader-rank 1 --loader-delay 0.2]
[--poison-moment-after 2]``; ``--nan-calls`` may end in "+" ("5+") to poison every call from there on. They patch
``smim_dist.train`` while ``injected`` is open: in the test's process, in a forked rank (tests/scripts/forked_ranks.py)
or in tests/scripts/train_with_faults.py, which puts them before smim-train's own arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import time

from smim_dist import train
from smim_dist.targets.build import build_target

PARSER = argparse.ArgumentParser(allow_abbrev=False)
PARSER.add_argument("--nan-calls", default="", help="comma list of target calls (0-based) to poison")
PARSER.add_argument("--nan-ranks", default="0", help="comma list of ranks whose target is poisoned")
PARSER.add_argument("--stop-after", type=int, help="request a stop after this many optimizer steps")
PARSER.add_argument("--slow-loader-rank", type=int, help="the rank whose loader sleeps before every batch")
PARSER.add_argument("--loader-delay", type=float, default=0.0, help="seconds that loader sleeps per batch")
PARSER.add_argument("--poison-moment-after", type=int, help="make rank 0's first exp_avg_sq infinite after this step")


def rank() -> int:
    return int(os.environ.get("RANK", 0))


class SlowLoader:
    def __init__(self, loader, delay: float):
        self.loader, self.delay = loader, delay

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


@contextlib.contextmanager
def injected(fault_args: list[str]):
    """Yields smim-train's own arguments: those of ``fault_args`` that are not faults."""
    faults, train_args = PARSER.parse_known_args(fault_args)
    ranks = {int(r) for r in faults.nan_ranks.split(",")}
    open_ended = faults.nan_calls.endswith("+")
    poisoned_calls = {int(c) for c in faults.nan_calls.rstrip("+").split(",") if c}
    real = {name: getattr(train, name) for name in ("train", "build_pretrain_loader", "build_engine", "build_target")}

    def poisoned_target(cfg):
        target = build_target(cfg)
        clean_forward, calls = target.forward, itertools.count()

        def forward(images, tokenizer_images=None):
            out = clean_forward(images, tokenizer_images)
            call = next(calls)
            hit = call in poisoned_calls or (open_ended and call >= min(poisoned_calls))
            return out * float("nan") if hit and rank() in ranks else out

        target.forward = forward
        return target

    def train_until_stop(cfg, dist_info, stop_requested, *args, **kwargs):
        """The loop asks once after each optimizer step."""
        steps = itertools.count(1)
        return real["train"](cfg, dist_info, lambda: next(steps) >= faults.stop_after, *args, **kwargs)

    def slowed_loader(cfg, loader_rank, *args):
        loader, sampler = real["build_pretrain_loader"](cfg, loader_rank, *args)
        return (SlowLoader(loader, faults.loader_delay) if loader_rank == faults.slow_loader_rank else loader), sampler

    def engine_with_a_poisoned_moment(*args, **kwargs):
        from smim_dist.engine.deepspeed_setup import fused_adamw

        engine = real["build_engine"](*args, **kwargs)
        real_step = engine.step

        def step():
            real_step()
            if engine.global_steps == faults.poison_moment_after and rank() == 0:
                optimizer = fused_adamw(engine)
                optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg_sq"].fill_(float("inf"))

        engine.step = step
        return engine

    if poisoned_calls:
        train.build_target = poisoned_target
    if faults.slow_loader_rank is not None:
        train.build_pretrain_loader = slowed_loader
    if faults.poison_moment_after is not None:
        train.build_engine = engine_with_a_poisoned_moment
    if faults.stop_after is not None:
        train.train = train_until_stop
    try:
        yield train_args
    finally:
        for name, value in real.items():
            setattr(train, name, value)
