"""Resume a checkpoint on another number of data-parallel ranks, keeping the global batch and the LR schedule.

The data side needs one number converted: the sampler lays an epoch out as (step, micro-step, rank, sample), and
checkpoints fall on step boundaries, so the s steps of the epoch done on W ranks are its first s x global_batch
samples on any world size, and ``batch_in_epoch`` becomes s x accumulation' (the micro-batch size may change with the
world size too; see ``OptimConfig.micro_batch``). The LR follows ``step``, which does not change. (Webdataset shards
are split over the ranks, so there the rest of an interrupted epoch is re-split: some of its samples are seen twice,
some not at all.)

The model side depends on where the optimizer state lives. Replicated (ZeRO-0 in fp32) it loads on any world size as
it is. Partitioned over the ranks (``*optim_states.pt`` files: ZeRO-1/2/3, and bf16 without ZeRO) it is first
converted by DeepSpeed's ``ds_to_universal`` into one folder per parameter (fp32 weights, Adam moments, step), which
any world size loads. Rank 0 converts once into ``<tag>/universal``, written under a temporary name with a manifest
and renamed when complete, so a half-written conversion is never loaded; a later resume of the same checkpoint on
any other world size reuses it, and pruning the checkpoint deletes it with it.

Per-rank RNG states do not carry over (rank r now reads other samples than rank r did), so each rank is reseeded from
(seed, step, rank): an elastic resume is reproducible, but its drop-path noise differs from an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from deepspeed.checkpoint import ds_to_universal

from smim_dist.config import Config
from smim_dist.engine.checkpoint import (MANIFEST, META, file_digests, checkpoint_problem,
                                         checkpoint_root, load_checkpoint)
from smim_dist.engine.distributed import DistInfo, barrier
from smim_dist.engine.loop import TrainState
from smim_dist.files import write_atomic
from smim_dist.seeding import reseed

UNIVERSAL = "universal"


def resume(engine, cfg: Config, dist_info: DistInfo, tag: str) -> TrainState:
    """Load checkpoint ``tag`` into ``engine``: DeepSpeed's own path when the world size is the one it was written with
    (a bit-exact resume), the universal conversion otherwise. Returns the train state for this world size."""
    folder = checkpoint_root(cfg.run_dir) / tag
    meta = json.loads((folder / META).read_text())
    old_world = meta["world_size"]
    if old_world == dist_info.world_size:
        return TrainState(**load_checkpoint(engine, cfg.run_dir, dist_info, tag)["train_state"])
    state = TrainState(**_load_elsewhere(engine, cfg.run_dir, folder, dist_info, old_world)["train_state"])
    state.batch_in_epoch = state.batch_in_epoch // meta["accumulation"] * engine.gradient_accumulation_steps()
    reseed(cfg.seed, state.step, dist_info.rank)
    return state


def _load_elsewhere(engine, run_dir: Path, folder: Path, dist_info: DistInfo, old_world: int) -> dict:
    """The client state; the model and optimizer loaded into ``engine``."""
    partitioned = any(folder.glob("*optim_states.pt"))
    if dist_info.is_main:  # before the run logger exists, in its format
        ranks = f"{old_world} rank{'s' if old_world > 1 else ''}"
        how = "converting its partitioned optimizer state to a universal checkpoint" if partitioned \
            else "its optimizer state is replicated and loads as it is"
        print(f"[{time.strftime('%H:%M:%S')}] checkpoint written by {ranks}, resuming on {dist_info.world_size}: "
              f"{how}; global batch and LR schedule kept, per-rank RNGs reseeded", file=sys.stderr, flush=True)
    if not partitioned:
        return load_checkpoint(engine, run_dir, dist_info, folder.name)
    if dist_info.is_main:
        _convert(folder)
    barrier()
    # DeepSpeed 0.19's ZeRO-3 universal load gives every param group the hyperparameters of the first (weight decay on
    # norms and biases here) and one shared Adam step tensor, which each group's update then increments: restore the
    # engine's own hyperparameters (the config cannot have changed) and give each group its own step
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    engine._config.load_universal_checkpoint = True
    try:
        path, client_state = engine.load_checkpoint(str(folder / UNIVERSAL), tag=folder.name)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {folder / UNIVERSAL}")
    for group, own in zip(engine.optimizer.param_groups, hyper):
        group.update(own)
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].clone()
    return client_state


def _convert(folder: Path) -> None:
    """Rank 0: write ``folder/universal`` unless a complete one is there. DeepSpeed's converter writes a
    ``latest_universal`` pointer beside its output, hence the tag folder inside."""
    final, partial = folder / UNIVERSAL, folder / f"{UNIVERSAL}.partial"
    if final.exists() and checkpoint_problem(final) is None:
        return
    for stale in (final, partial):
        shutil.rmtree(stale, ignore_errors=True)
    # one worker: the converter's process pool would fork this process, threads and process group included
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(folder), output_folder=str(partial / folder.name), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    write_atomic(partial / MANIFEST, json.dumps(file_digests(partial, flush=True), indent=1) + "\n")
    partial.rename(final)
