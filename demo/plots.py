"""Contact sheets and charts for the demo experiments (`sdrt.demo.sweep`), drawn with Pillow alone.

`contact_sheet` lays generated images out in a labelled grid, each upscaled by one integer factor with NEAREST so
every generated pixel stays a crisp square; `sheet_layout` says where each cell lands, so a caller (or a test) can
find a cell again. `line_chart` draws a metric against a swept value and `bar_chart` compares groups of bars; both
label their axes and every plotted value.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 13
TITLE_FONT_SIZE = 15
#: line height of the label font, in pixels
LINE_HEIGHT = 16
#: space around and between cells
PAD = 6
#: width of the row-label column (labels wrap to fit)
ROW_LABEL_WIDTH = 230
#: height of the title band (two lines) and of the column-header band (two lines)
TITLE_HEIGHT = 2 * LINE_HEIGHT + 2 * PAD
HEADER_HEIGHT = 2 * LINE_HEIGHT + PAD
#: cells are upscaled by the smallest integer factor that makes the smallest image side at least this many pixels
MIN_CELL_SIDE = 96
BLANK = (235, 235, 235)
#: series colours of the charts, in order
SERIES_COLOURS = ("#1f5fbf", "#d9822b", "#3a9d4a", "#c23b3b", "#8e6bbf", "#6b6b6b")
CHART_SIZE = (760, 460)
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 70, 170, 72, 64


def font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at `size` (FreeType, Pillow >= 10.1), or its fixed bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the bitmap font has one size
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, typeface) -> list[str]:
    """`text` split at its newlines, then greedily at spaces so that each line fits `width` pixels where possible."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=typeface) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _text_block(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, width: int, typeface,
                max_lines: int | None = None, centred: bool = False) -> None:
    lines = _wrap(draw, text, width, typeface)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    x, y = xy
    for index, line in enumerate(lines):
        offset = (width - draw.textlength(line, font=typeface)) / 2 if centred else 0
        draw.text((x + max(offset, 0), y + index * LINE_HEIGHT), line, fill="black", font=typeface)


@dataclasses.dataclass(frozen=True)
class SheetLayout:
    """Where a contact sheet puts things: column widths and row heights are those of the largest upscaled cell."""

    scale: int
    column_widths: tuple[int, ...]
    row_heights: tuple[int, ...]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole sheet in pixels."""
        width = ROW_LABEL_WIDTH + sum(self.column_widths) + (len(self.column_widths) + 1) * PAD
        height = TITLE_HEIGHT + HEADER_HEIGHT + sum(self.row_heights) + (len(self.row_heights) + 1) * PAD
        return width, height

    def origin(self, row: int, column: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of cell (`row`, `column`): its image is pasted there."""
        x = ROW_LABEL_WIDTH + PAD + sum(self.column_widths[:column]) + column * PAD
        y = TITLE_HEIGHT + HEADER_HEIGHT + PAD + sum(self.row_heights[:row]) + row * PAD
        return x, y


def sheet_layout(cells: Sequence[Sequence[np.ndarray | None]], scale: int | None = None) -> SheetLayout:
    """The layout `contact_sheet` uses for `cells`; `scale` defaults to the smallest integer factor that brings the
    smallest image side up to MIN_CELL_SIDE (at least 1)."""
    if not cells or not cells[0] or any(len(row) != len(cells[0]) for row in cells):
        raise ValueError("cells must be a non-empty rectangular grid (use None for a blank cell)")
    images = [cell for row in cells for cell in row if cell is not None]
    if not images:
        raise ValueError("cells holds no image")
    if scale is None:
        scale = max(1, math.ceil(MIN_CELL_SIDE / min(min(image.shape[:2]) for image in images)))
    widths = tuple(max((row[c].shape[1] * scale for row in cells if row[c] is not None), default=MIN_CELL_SIDE)
                   for c in range(len(cells[0])))
    heights = tuple(max((cell.shape[0] * scale for cell in row if cell is not None), default=MIN_CELL_SIDE) for row in cells)
    return SheetLayout(scale=scale, column_widths=widths, row_heights=heights)


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """An (H, W, 3) uint8 image enlarged `scale` times with NEAREST: each pixel becomes a scale x scale square."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)  # (H * scale, W * scale, 3)


def contact_sheet(cells: Sequence[Sequence[np.ndarray | None]], row_labels: Sequence[str], column_labels: Sequence[str],
                  title: str, scale: int | None = None) -> Image.Image:
    """A grid of (H, W, 3) uint8 images (None: a blank cell) with a title, a label per column above it and a label
    per row at its left, every image upscaled `scale` times (see `sheet_layout`) and pasted at its cell's origin."""
    layout = sheet_layout(cells, scale)
    if len(row_labels) != len(cells) or len(column_labels) != len(cells[0]):
        raise ValueError(f"{len(cells)}x{len(cells[0])} cells need as many row and column labels, "
                         f"got {len(row_labels)} and {len(column_labels)}")
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    body, heading = font(), font(TITLE_FONT_SIZE)
    _text_block(draw, (PAD, PAD), title, layout.size[0] - 2 * PAD, heading, max_lines=2)
    for column, label in enumerate(column_labels):
        x, _ = layout.origin(0, column)
        _text_block(draw, (x, TITLE_HEIGHT), label, layout.column_widths[column], body, max_lines=2, centred=True)
    for row, label in enumerate(row_labels):
        _, y = layout.origin(row, 0)
        max_lines = max(1, layout.row_heights[row] // LINE_HEIGHT)
        _text_block(draw, (PAD, y), label, ROW_LABEL_WIDTH - 2 * PAD, body, max_lines=max_lines)
        for column, cell in enumerate(cells[row]):
            x, y = layout.origin(row, column)
            if cell is None:
                draw.rectangle([x, y, x + layout.column_widths[column] - 1, y + layout.row_heights[row] - 1], fill=BLANK)
                continue
            if cell.ndim != 3 or cell.shape[2] != 3 or cell.dtype != np.uint8:
                raise ValueError(f"cell ({row}, {column}): expected an (H, W, 3) uint8 image, got {cell.shape} {cell.dtype}")
            sheet.paste(Image.fromarray(upscale(cell, layout.scale)), (x, y))
    return sheet


def _format(value: float) -> str:
    return f"{value:.2f}"


def _axes(image: Image.Image, draw: ImageDraw.ImageDraw, title: str, x_label: str, y_label: str, y_range: tuple[float, float]):
    """Draw the title, the axes, the y ticks and the axis labels; return a function mapping y values to pixel rows
    and the plot area (left, top, right, bottom)."""
    width, height = CHART_SIZE
    left, top, right, bottom = _MARGIN_LEFT, _MARGIN_TOP, width - _MARGIN_RIGHT, height - _MARGIN_BOTTOM
    body, heading = font(), font(TITLE_FONT_SIZE)
    _text_block(draw, (PAD, PAD), title, width - 2 * PAD, heading, max_lines=2)
    low, high = y_range

    def y_pixel(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    for tick in np.linspace(low, high, 6):
        y = y_pixel(float(tick))
        draw.line([left, y, right, y], fill=(225, 225, 225))
        label = f"{tick:g}"
        draw.text((left - 8 - draw.textlength(label, font=body), y - LINE_HEIGHT / 2), label, fill="black", font=body)
    draw.line([left, top, left, bottom], fill="black")
    draw.line([left, bottom, right, bottom], fill="black")
    draw.text(((left + right) / 2 - draw.textlength(x_label, font=body) / 2, bottom + 2.2 * LINE_HEIGHT), x_label,
              fill="black", font=body)
    # The y label, written horizontally then rotated to read bottom to top.
    label_image = Image.new("RGB", (int(draw.textlength(y_label, font=body)) + 4, LINE_HEIGHT + 2), "white")
    ImageDraw.Draw(label_image).text((2, 0), y_label, fill="black", font=body)
    rotated = label_image.rotate(90, expand=True)
    image.paste(rotated, (PAD, int((top + bottom) / 2 - rotated.height / 2)))
    return y_pixel, (left, top, right, bottom)


def _legend(draw: ImageDraw.ImageDraw, names: Sequence[str], top: int) -> None:
    body = font()
    x, y = CHART_SIZE[0] - _MARGIN_RIGHT + 16, top
    for index, name in enumerate(names):
        draw.rectangle([x, y + 3, x + 12, y + 13], fill=SERIES_COLOURS[index % len(SERIES_COLOURS)])
        lines = _wrap(draw, name, _MARGIN_RIGHT - 40, body)
        _text_block(draw, (x + 18, y), name, _MARGIN_RIGHT - 40, body)
        y += len(lines) * LINE_HEIGHT + 4


def line_chart(x_labels: Sequence[str], series: dict[str, Sequence[float]], title: str, x_label: str, y_label: str,
               x_positions: Sequence[float] | None = None, y_range: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """One line per series over the x values (`x_positions`, numeric, or evenly spaced when None), ticks labelled
    `x_labels`; NaN values are left out. The first series is drawn thicker with its value next to every point."""
    positions = [float(p) for p in (x_positions if x_positions is not None else range(len(x_labels)))]
    if len(positions) != len(x_labels) or any(len(values) != len(x_labels) for values in series.values()):
        raise ValueError("every series needs one value per x label")
    image = Image.new("RGB", CHART_SIZE, "white")
    draw = ImageDraw.Draw(image)
    y_pixel, (left, top, right, bottom) = _axes(image, draw, title, x_label, y_label, y_range)
    body = font()
    span = (max(positions) - min(positions)) or 1.0
    inset = 24

    def x_pixel(position: float) -> float:
        return left + inset + (position - min(positions)) / span * (right - left - 2 * inset)

    for position, label in zip(positions, x_labels):
        x = x_pixel(position)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - draw.textlength(label, font=body) / 2, bottom + 6), label, fill="black", font=body)
    for index, (name, values) in reversed(list(enumerate(series.items()))):  # the first series on top
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        points = [(x_pixel(p), y_pixel(v)) for p, v in zip(positions, values) if not math.isnan(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3 if index == 0 else 1)
        radius = 4 if index == 0 else 2
        for x, y in points:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        if index == 0:
            for (x, y), value in zip(points, [v for v in values if not math.isnan(v)]):
                draw.text((x + 5, y - LINE_HEIGHT - 2), _format(value), fill=colour, font=body)
    _legend(draw, list(series), top)
    return image


def bar_chart(group_labels: Sequence[str], series: dict[str, Sequence[float]], title: str, x_label: str, y_label: str,
              y_range: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """Side-by-side bars, one per series, for each group, with each bar's value above it; NaN bars are left out."""
    if any(len(values) != len(group_labels) for values in series.values()):
        raise ValueError("every series needs one value per group")
    image = Image.new("RGB", CHART_SIZE, "white")
    draw = ImageDraw.Draw(image)
    y_pixel, (left, top, right, bottom) = _axes(image, draw, title, x_label, y_label, y_range)
    body = font(11)
    group_width = (right - left) / max(len(group_labels), 1)
    bar_width = group_width * 0.8 / max(len(series), 1)
    for group, label in enumerate(group_labels):
        start = left + group * group_width + group_width * 0.1
        for index, values in enumerate(series.values()):
            value = values[group]
            if math.isnan(value):
                continue
            x0 = start + index * bar_width
            draw.rectangle([x0, y_pixel(value), x0 + bar_width - 2, bottom], fill=SERIES_COLOURS[index % len(SERIES_COLOURS)])
            text = _format(value)
            draw.text((x0 + (bar_width - 2 - draw.textlength(text, font=body)) / 2, y_pixel(value) - LINE_HEIGHT),
                      text, fill="black", font=body)
        centre = left + (group + 0.5) * group_width
        draw.text((centre - draw.textlength(label, font=font()) / 2, bottom + 6), label, fill="black", font=font())
    _legend(draw, list(series), top)
    return image
