"""FFCV operations for pre-training: a decoder that crops, resizes, flips and colour-jitters each image, and a
transform that draws each sample's patch mask, both inside FFCV's compiled, multi-threaded pipeline; and for
segmentation evaluation a decoder that resizes a whole image or label map to a square.

FFCV's own random decoders draw from numba's per-thread RNG, so a crop depends on which thread decoded it and
cannot be reproduced after a restart. These draw from ``smim_dist.data.seeded`` with a key made of (seed, epoch,
sample index). FFCV gives a decoder the batch's sample indices but not the epoch, so each batch reads the epoch once
from an ``EpochClock`` through numba's object mode (a few microseconds per batch, outside the per-sample loop).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import njit, objmode
from numba.core.errors import NumbaWarning

from smim_dist.data.seeded import crop_box, flips, jitter_factors, sample_key, split_mask

warnings.filterwarnings("ignore", message="Code running in object mode won't allow parallel", category=NumbaWarning)


@dataclass
class EpochClock:
    """The epoch the compiled operations key their draws with; set it only while no epoch is being loaded."""

    epoch: int = 0


@njit(cache=True, nogil=True)
def flip_in_place(image: np.ndarray) -> None:
    width = image.shape[1]
    for row in range(image.shape[0]):
        for col in range(width // 2):
            for channel in range(3):
                left = image[row, col, channel]
                image[row, col, channel] = image[row, width - 1 - col, channel]
                image[row, width - 1 - col, channel] = left


@njit(cache=True, nogil=True)
def _uint8(value: float) -> np.uint8:
    """Round to float32, clamp to [0, 255], truncate: torch's float32 result of a uint8 colour op, back to uint8."""
    return np.uint8(min(np.float32(255.0), max(np.float32(0.0), np.float32(value))))


@njit(cache=True, nogil=True)
def jitter_in_place(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> None:
    """torchvision's uint8 ``adjust_brightness``, ``adjust_contrast`` and ``adjust_saturation`` in that order, as the
    image-file loader applies them, equal to what torch computes where its CPU kernels are vectorised with fused
    multiply-adds (x86-64 with AVX2, Arm): products in float32, ``x + alpha * y`` and the grey's sums rounded once
    to float32 (each such sum of 8-bit values times float32 factors is exact in float64, so one float32 rounding of
    it is the FMA), greys floored, results clamped and truncated to uint8. Brightness and contrast map values one to
    one, so they compose into a 256-entry table; the grey's and saturation's products come from tables too."""
    pixels = image.reshape(-1, 3)
    bright, table = np.empty(256, dtype=np.uint8), np.empty(256, dtype=np.uint8)
    red, green, blue, kept = (np.empty(256), np.empty(256), np.empty(256), np.empty(256))
    for value in range(256):
        bright[value] = _uint8(np.float32(value) * np.float32(brightness))
        red[value] = np.float32(value) * np.float32(0.2989)
        green[value] = value * np.float64(np.float32(0.587))
        blue[value] = value * np.float64(np.float32(0.114))
        kept[value] = np.float32(value) * np.float32(saturation)
    grey_total = 0
    for p in range(pixels.shape[0]):
        r, g, b = bright[pixels[p, 0]], bright[pixels[p, 1]], bright[pixels[p, 2]]
        grey_total += int(np.float32(blue[b] + np.float32(green[g] + red[r])))
    mean = np.float32(grey_total) / np.float32(pixels.shape[0])
    mean_share = np.float64(mean) * np.float64(np.float32(1.0 - contrast))
    for value in range(256):
        table[value] = _uint8(mean_share + np.float32(np.float32(bright[value]) * np.float32(contrast)))
    grey_weight = np.float64(np.float32(1.0 - saturation))
    for p in range(pixels.shape[0]):
        r, g, b = table[pixels[p, 0]], table[pixels[p, 1]], table[pixels[p, 2]]
        grey_share = np.floor(np.float32(blue[b] + np.float32(green[g] + red[r]))) * grey_weight
        pixels[p, 0] = _uint8(grey_share + kept[r])
        pixels[p, 1] = _uint8(grey_share + kept[g])
        pixels[p, 2] = _uint8(grey_share + kept[b])


def pixel_decoder():
    """A compiled ``(stored bytes, metadata field, scratch) -> [height, width, 3]`` pixels: a view of the bytes when
    raw, decoded into ``scratch`` when JPEG. Built afresh for each pipeline, as FFCV builds its own decoders: numba
    dispatchers shared between loaders that compile in their own threads at once fail intermittently."""
    imdecode_c, jpeg = Compiler.compile(imdecode), IMAGE_MODES["jpg"]

    def decoded_pixels(data, field, scratch):
        height, width = np.uint32(field["height"]), np.uint32(field["width"])
        if field["mode"] == jpeg:
            pixels = scratch[: 3 * height * width]
            imdecode_c(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
            return pixels.reshape(height, width, 3)
        return data.reshape(height, width, 3)

    return Compiler.compile(decoded_pixels)


class SquareImageDecoder(Operation):
    """A decoder of ``RGBImageField`` samples into ``size`` x ``size`` x 3 uint8, with room to decode the largest
    JPEG of the file per batch slot: ``largest`` pixels where the caller knows it (a sharded set's manifest records
    it), else found by a pass over every sample's metadata."""

    def __init__(self, size: int, largest: int | None = None):
        super().__init__()
        self.size, self.largest = size, largest

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        largest = self.largest or int(self.metadata["width"].max()) * int(self.metadata["height"].max())
        shape = (self.size, self.size, 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")),
                (AllocationQuery(shape, np.dtype("u1")), AllocationQuery((3 * largest,), np.dtype("u1"))))


class SeededCropDecoder(SquareImageDecoder):
    """Decode an ``RGBImageField`` (JPEG or raw) straight into a ``size`` x ``size`` random resized crop, then flip
    and jitter it: the crop box, flip and factors are those ``PretrainTransform`` draws for the same sample."""

    def __init__(self, size: int, seed: int, clock: EpochClock, scale: tuple[float, float],
                 ratio: tuple[float, float], hflip: float, color_jitter: float, largest: int | None = None):
        super().__init__(size, largest)
        self.seed, self.clock = seed, clock
        self.scale, self.ratio, self.hflip, self.color_jitter = scale, ratio, hflip, color_jitter

    def generate_code(self):
        mem_read, clock, seed = self.memory_read, self.clock, self.seed
        decoded_pixels, resize_crop_c = pixel_decoder(), Compiler.compile(resize_crop)
        parallel_range = Compiler.get_iterator()
        (scale_lo, scale_hi), (ratio_lo, ratio_hi) = self.scale, self.ratio
        hflip, strength = self.hflip, self.color_jitter

        def decode(batch_indices, storage, metadata, storage_state):
            destination, scratch = storage
            with objmode(epoch="int64"):
                epoch = clock.epoch
            for slot in parallel_range(len(batch_indices)):
                sample = batch_indices[slot]
                key = sample_key(seed, epoch, sample)
                field = metadata[sample]
                data = mem_read(field["data_ptr"], storage_state)
                image = decoded_pixels(data, field, scratch[slot])
                height, width = image.shape[0], image.shape[1]
                top, left, h, w = crop_box(key, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi)
                resize_crop_c(image, top, top + h, left, left + w, destination[slot])
                if flips(key, hflip):
                    flip_in_place(destination[slot])
                if strength > 0:
                    brightness, contrast, saturation = jitter_factors(key, strength)
                    jitter_in_place(destination[slot], brightness, contrast, saturation)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededPatchMasks(Operation):
    """From a batch of sample indices (the ``index`` field) to each sample's mask as one int64 row: the visible patch
    indices, then the masked ones, both ascending, so the loader splits them into ``MaskIndices`` by slicing."""

    def __init__(self, generator, seed: int, clock: EpochClock):
        super().__init__()
        self.generator, self.seed, self.clock = generator, seed, clock

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        shape = (self.generator.num_patches,)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("i8")),
                AllocationQuery(shape, np.dtype("i8")))

    def generate_code(self):
        draw, clock, seed = self.generator.draw_function(), self.clock, self.seed
        parallel_range = Compiler.get_iterator()

        def masks(indices, destination):
            with objmode(epoch="int64"):
                epoch = clock.epoch
            for slot in parallel_range(indices.shape[0]):
                split_mask(draw(sample_key(seed, epoch, indices[slot, 0])), destination[slot])
            return destination[: indices.shape[0]]

        masks.is_parallel = True
        return masks


@njit(cache=True, nogil=True)
def resize_nearest(image: np.ndarray, destination: np.ndarray) -> None:
    """Nearest-neighbour resize of HxWx3 ``image`` into ``destination``: output pixel (r, c) takes source pixel
    (floor((r + 0.5) H / h), floor((c + 0.5) W / w)), the pixel under its centre, in exact integer arithmetic. This is
    PIL's NEAREST and torch's "nearest-exact" (OpenCV's INTER_NEAREST omits the half-pixel and shifts the map)."""
    height, width = image.shape[0], image.shape[1]
    out_height, out_width = destination.shape[0], destination.shape[1]
    for row in range(out_height):
        source_row = ((2 * row + 1) * height) // (2 * out_height)
        for col in range(out_width):
            source_col = ((2 * col + 1) * width) // (2 * out_width)
            for channel in range(3):
                destination[row, col, channel] = image[source_row, source_col, channel]


class ResizeDecoder(SquareImageDecoder):
    """Decode an ``RGBImageField`` (JPEG or raw) and resize the whole image, aspect not kept, to ``size`` x ``size``:
    the fixed-size input of segmentation evaluation. ``nearest=False`` resizes with OpenCV's INTER_AREA (FFCV's
    ``resize_crop``), for images; ``nearest=True`` with ``resize_nearest``, for label maps, whose ids must never be
    blended."""

    def __init__(self, size: int, nearest: bool = False):
        super().__init__(size)
        self.nearest = nearest

    def generate_code(self):
        mem_read, nearest = self.memory_read, self.nearest
        decoded_pixels, resize_crop_c = pixel_decoder(), Compiler.compile(resize_crop)
        parallel_range = Compiler.get_iterator()

        def decode(batch_indices, storage, metadata, storage_state):
            destination, scratch = storage
            for slot in parallel_range(len(batch_indices)):
                field = metadata[batch_indices[slot]]
                data = mem_read(field["data_ptr"], storage_state)
                image = decoded_pixels(data, field, scratch[slot])
                if nearest:
                    resize_nearest(image, destination[slot])
                else:
                    resize_crop_c(image, 0, image.shape[0], 0, image.shape[1], destination[slot])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
