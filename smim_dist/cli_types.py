"""Value types of the command lines' options (argparse ``type=``): each refuses a bad value saying what it takes."""

from __future__ import annotations

import argparse

from smim_dist.slurm_cluster import slurm_minutes


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more")
    return value


def minutes(text: str) -> int:
    """A SLURM time limit in whole minutes, rounded up."""
    value = slurm_minutes(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    return value
