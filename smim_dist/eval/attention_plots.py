"""PNG figures of ``smim-eval attention`` results, drawn with PIL (the project does not depend on matplotlib).

Heat maps keep the patch resolution (nearest-neighbour upscaling) and are scaled to each map's own maximum, so they
show where a token looks, not how much; the numbers are in ``attention.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

TILE = 224
"""approximate tile side in pixels: small images are upscaled by a whole factor so patches stay square"""
LABEL_HEIGHT = 16
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
"""inferno-like: dark (no attention) to bright yellow (the map's maximum)"""
COLOURS = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                    for c in range(3)], axis=1).astype(np.uint8)


def _heat(values: list, side: int) -> Image.Image:
    grid = np.asarray(values, dtype=np.float64)
    colours = COLOURS[np.round(grid / grid.max() * 255).astype(np.uint8)]
    return Image.fromarray(colours).resize((side, side), Image.Resampling.NEAREST)


def _photo(pixels: Tensor, side: int) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize((side, side), Image.Resampling.NEAREST)


def _overlay(pixels: Tensor, values: list, side: int) -> Image.Image:
    return Image.blend(_photo(pixels, side), _heat(values, side), 0.6)


def _row(tiles: list[Image.Image], labels: list[str]) -> Image.Image:
    """Tiles side by side, each under its label."""
    side = tiles[0].width
    row = Image.new("RGB", (side * len(tiles), side + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(row)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        row.paste(tile, (i * side, LABEL_HEIGHT))
        draw.text((i * side + 2, 2), label, fill="black")
    return row


def _distance_chart(distances: list[list[float]], img_size: int) -> Image.Image:
    """Fig. 13: one dot per head at each layer, and the layer's mean as a line."""
    width, height, left, right, top, bottom = 560, 360, 60, 20, 24, 44
    depth = len(distances)
    ceiling = max(max(max(row) for row in distances), 1e-9) * 1.1

    def at(layer: float, distance: float) -> tuple[float, float]:
        return (left + (layer + 0.5) / depth * (width - left - right),
                height - bottom - distance / ceiling * (height - top - bottom))

    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for tick in np.linspace(0, ceiling, 5):
        y = at(0, tick)[1]
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((4, y - 6), f"{tick:.1f}", fill="black")
    for layer, row in enumerate(distances):
        x = at(layer, 0)[0]
        draw.text((x - 4, height - bottom + 4), str(layer), fill="black")
        for distance in row:
            _, y = at(layer, distance)
            draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=(188, 55, 84))
    draw.line([at(layer, float(np.mean(row))) for layer, row in enumerate(distances)], fill=(87, 16, 110), width=2)
    draw.text((left, 4), f"mean attention distance (px, {img_size} px image) per head", fill="black")
    draw.text((width // 2 - 20, height - 20), "layer", fill="black")
    return chart


def render_figures(out_dir: Path, results: dict, pixels: list[Tensor]) -> list[str]:
    """Write the figures of ``results`` (``run_attention``'s) for the shown images ``pixels`` (uint8 ``[3, S, S]``)
    into ``out_dir``; returns their file names."""
    side = results["img_size"] * max(1, round(TILE / results["img_size"]))
    cell = side // results["grid"][0]
    (row, col), layer, names = results["query"], results["layer"], results["prefix_tokens"]
    figures: dict[str, Image.Image] = {}
    for image, shown in zip(pixels, results["shown"]):
        query = _overlay(image, shown["query"], side)
        ImageDraw.Draw(query).rectangle([(col * cell, row * cell), ((col + 1) * cell - 1, (row + 1) * cell - 1)],
                                        outline=(0, 255, 255), width=2)
        figures[f"query_{shown['index']}.png"] = _row(
            [_photo(image, side), query], [f"val image {shown['index']}", f"layer {layer}, query {row},{col}"])
        figures[f"prefix_{shown['index']}.png"] = _row(
            [_photo(image, side), *(_overlay(image, values, side) for values in shown["prefix"])],
            [f"val image {shown['index']}", *(f"{name}, layer {layer}" for name in names)])
    figures["prefix_mean.png"] = _row(
        [_heat(token["map"], side) for token in results["prefix_mean"]],
        [f"{token['token']}: H {token['entropy_of_mean']:.2f} / {results['max_entropy']:.2f}"
         for token in results["prefix_mean"]])
    figures["mean_distance.png"] = _distance_chart(results["mean_distance_px"], results["img_size"])
    for name, figure in figures.items():
        figure.save(out_dir / name)
    return list(figures)
