"""A picture of a few processed images with their landmarks drawn, for a person to look at."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.io.output import output_file_name
from pipeline.io.shards import list_shards, read_samples
from pipeline.io.storage import read_bytes, write_bytes
from pipeline.stages.preprocess import decode_image

TILE = 320


def _draw_points(draw: ImageDraw.ImageDraw, points, scale: float, colour, radius: float) -> None:
    for x, y in points:
        x, y = x * scale, y * scale
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)


def save_preview(
    input_uri: str,
    output_uri: str,
    picture_path: str,
    count: int = 8,
    fmt: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
    columns: int = 4,
) -> int:
    """Draw predicted landmarks (red) of every face, their crops (blue) and detector boxes
    (yellow) and, where the sidecar has them, the labelled ones (green) on the first ``count``
    good samples of the first shard. Returns how many were drawn."""
    shard = list_shards(input_uri, fmt, storage_options)[0]
    png, drawn = render_preview(shard, output_uri, count, storage_options, columns)
    if png is not None:
        write_bytes(picture_path, png, storage_options)
    return drawn


def render_preview(shard, output_uri: str, count: int = 8,
                   storage_options: Mapping[str, Any] | None = None, columns: int = 4,
                   tile_size: int = TILE, colours: int | None = None
                   ) -> tuple[bytes | None, int]:
    """The picture ``save_preview`` saves, of ``shard`` (a PNG; None without a good sample),
    and how many images it shows; ``colours``: a palette of that many (a smaller file)."""
    part = read_bytes(f"{output_uri.rstrip('/')}/{output_file_name(shard.name)}", storage_options)
    table = pq.read_table(pa.BufferReader(part))
    names = table.schema.names
    wanted = [c for c in ("key", "landmarks", "crop", "error", "face_box") if c in names]
    by_key: dict[str, list[dict]] = {}  # every good row of a key: one per face found
    for r in table.select(wanted).to_pylist():
        if r["error"] is None and r["landmarks"] is not None:  # not an error, nor no_face
            by_key.setdefault(r["key"], []).append(r)
    tiles = []
    for sample in read_samples(shard, storage_options):
        faces = by_key.get(sample.key)
        if not faces or sample.data is None:
            continue
        image = decode_image(sample.data)
        scale = tile_size / max(image.size)
        tile = image.resize((round(image.width * scale), round(image.height * scale)))
        draw = ImageDraw.Draw(tile)
        truth = (sample.meta or {}).get("landmarks")
        if truth:
            _draw_points(draw, truth, scale, (40, 220, 60), 2.0)
        for row in faces:
            x0, y0, x1, y1 = (v * scale for v in row["crop"])
            draw.rectangle([x0, y0, x1, y1], outline=(60, 120, 255), width=2)
            # Smaller dots on small crops, so that 68 of them do not cover the face.
            radius = min(2.0, max(1.0, (x1 - x0) / 70))
            if row.get("face_box"):
                box = [v * scale for v in row["face_box"]]
                draw.rectangle(box, outline=(255, 220, 0), width=1)
            _draw_points(draw, row["landmarks"], scale, (255, 40, 40), radius)
        draw.text((4, 4), sample.key, fill=(255, 255, 0))
        tiles.append(tile)
        if len(tiles) == count:
            break
    if not tiles:
        return None, 0
    rows_n = (len(tiles) + columns - 1) // columns
    legend_height = 16  # a strip of its own under the tiles: the legend covers no picture
    # Cells as large as the largest tile: landscape images leave no empty band below them.
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (cell_w * min(columns, len(tiles)),
                              cell_h * rows_n + legend_height), (30, 30, 30))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * cell_w, (i // columns) * cell_h))
    legend = "red: predicted  green: labelled  blue: model crop  yellow: detected face"
    ImageDraw.Draw(sheet).text((4, sheet.height - legend_height + 2), legend,
                               fill=(255, 255, 255))
    if colours:
        sheet = sheet.quantize(colours, method=Image.Quantize.MEDIANCUT)
    png = io.BytesIO()
    sheet.save(png, format="PNG", optimize=bool(colours))
    return png.getvalue(), len(tiles)

