"""Fault injection for the NaN guard: ``smim-train`` whose target turns non-finite on chosen calls of chosen ranks.

    python tests/scripts/train_with_nan.py RANKS CALLS --config ... overrides

RANKS and CALLS are comma lists ("0" / "4,5"); CALLS may end in "+" ("5+") to poison every call from there on.
"""

import os
import sys

from smim_dist import train
from smim_dist.targets.build import build_target

ranks = {int(r) for r in sys.argv[1].split(",")}
calls_spec = sys.argv[2]
open_ended = calls_spec.endswith("+")
poisoned_calls = {int(c) for c in calls_spec.rstrip("+").split(",")}


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


train.build_target = poisoned_target
sys.exit(train.main(sys.argv[3:]))
