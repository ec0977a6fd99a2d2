"""FFCV's loader over a sharded data set (``smim_dist.data.sharded_beton``): the same compiled pipeline as for one
.beton, reading each sample from its shard.

FFCV 1.0.2's ``Loader`` opens its one file itself, and its memory managers build Python dictionaries of every
allocation and page (gigabytes, minutes at hundreds of millions of samples). ``UnionLoader`` sets up FFCV's pipeline
graph exactly as ``Loader.__init__`` does, but on a ``ShardedReader``, with ``UnionMemory``: an allocation's size is
found by binary search in the index's sorted pointers, its bytes read by one ``pread`` from its shard.
"""

from __future__ import annotations

import os
import weakref

import numba as nb
import numpy as np
from ffcv.libffcv import read_c
from ffcv.loader import Loader
from ffcv.loader.loader import ORDER_MAP
from ffcv.memory_managers.base import MemoryContext, MemoryManager
from ffcv.pipeline import Compiler, PipelineSpec
from ffcv.pipeline.graph import Graph

from smim_dist.data.sharded_beton import OFFSET_BITS, ShardedReader, open_files

_SHIFT = np.uint64(OFFSET_BITS)
_OFFSET_MASK = np.uint64((1 << OFFSET_BITS) - 1)


class _OpenShards(MemoryContext):
    def __init__(self, files: np.ndarray, ptrs: np.ndarray, sizes: np.ndarray):
        self._state = (files, ptrs, sizes)

    @property
    def state(self):
        return self._state

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return None


class UnionMemory(MemoryManager):
    """Reads allocations by union pointer; the shard files stay open as long as the loader lives."""

    def __init__(self, reader: ShardedReader):  # not FFCV's: its per-allocation dictionaries are what this avoids
        self.reader = reader
        files = open_files(reader.shards)
        weakref.finalize(self, lambda: [os.close(int(fd)) for fd in files])
        self.context = _OpenShards(files, reader.ptrs, reader.sizes)

    def schedule_epoch(self, schedule):
        return self.context

    @property
    def state_type(self):  # abstract in FFCV's MemoryManager
        readonly = nb.types.Array(nb.uint64, 1, "C", readonly=True)
        return nb.types.Tuple([nb.int32[::1], readonly, readonly])

    def compile_reader(self):
        shift, mask = _SHIFT, _OFFSET_MASK

        def read(address, state):
            files, ptrs, sizes = state
            size = sizes[np.searchsorted(ptrs, address)]
            out = np.empty(size, np.uint8)
            fd, offset, done = files[address >> shift], address & mask, np.uint64(0)
            while done < size:
                got = read_c(fd, out[done:].ctypes.data, size - done, offset + done)
                if got <= 0:
                    raise OSError("a shard ended early or could not be read; was it changed after conversion?")
                done += np.uint64(got)
            return out

        # typed at its first call: FFCV's OSCacheManager.state_type marks numba's shared uint8[::1] type read-only,
        # so a signature naming it would refuse this function's fresh arrays once any single-file loader exists
        return Compiler.compile(read)


class UnionLoader(Loader):
    """``ffcv.loader.Loader(fname, batch_size, num_workers, order, pipelines, drop_last, batches_ahead, indices)`` for a
    sharded data set; a field without a pipeline is left out (FFCV would decode it by default)."""

    def __init__(self, reader: ShardedReader, batch_size: int, num_workers: int, order, pipelines: dict,
                 drop_last: bool = True, batches_ahead: int = 3, indices: np.ndarray | None = None):
        self.fname, self.reader = reader.file_name, reader
        self.batch_size, self.num_workers, self.batches_ahead = batch_size, num_workers, batches_ahead
        self.drop_last, self.distributed, self.recompile, self.seed = drop_last, False, False, 0
        self.code, self.next_epoch = None, 0
        self._args = {}
        Compiler.set_num_threads(num_workers)
        self.indices = np.arange(reader.num_samples, dtype=np.uint64) if indices is None else np.asarray(indices)
        self.memory_manager = UnionMemory(reader)
        self.traversal_order = ORDER_MAP[order](self) if order in ORDER_MAP else order(self)
        self.field_name_to_f_ix = {name: ix for ix, name in enumerate(reader.handlers)}
        self.pipelines = {}
        self.pipeline_specs = {name: spec if isinstance(spec, PipelineSpec) else PipelineSpec(name, transforms=spec)
                               for name, spec in pipelines.items() if spec is not None}
        self.graph = Graph(self.pipeline_specs, reader.handlers, self.field_name_to_f_ix, reader.metadata,
                           self.memory_manager.compile_reader())
        self.generate_code()
        self.first_traversal_order = self.next_traversal_order()
