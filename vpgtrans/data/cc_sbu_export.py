"""Write JSONL caption data (e.g. the synthetic world's) in MiniGPT-4's `cc_sbu_align` layout.

Output: ``filter_cap.json`` = ``{"annotations": [{"image_id", "caption"}]}`` and ``image/{image_id}.jpg``,
exactly what `read_cc_sbu_align` (and MiniGPT-4's own loader) reads, so the MiniGPT-4 recipes run on it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_dir
from ..errors import DataError
from .readers import BadSamples, ImageReader, read_jsonl


def _image_id(record: dict[str, Any], index: int) -> str:
    """A file-name-safe id: the row's `id` when it has one, else its position."""
    raw = str(record.get("id", index))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw).lstrip(".") or str(index)


def export_cc_sbu(world_data_jsonl: str | Path, out_dir: str | Path, *, quality: int = 95,
                  limit: int | None = None) -> dict[str, Any]:
    """Export a caption JSONL (rows with `image` and `caption`) as a cc_sbu_align folder; returns a summary."""
    records = read_jsonl(world_data_jsonl, task="caption", bad=BadSamples())
    if limit:
        records = records[:limit]
    if not records:
        raise DataError(f"{world_data_jsonl} holds no captioned images", "export a split that has captions")
    reader = ImageReader()
    annotations, seen = [], set()
    out_dir = Path(out_dir).expanduser()
    # Built in a temporary sibling and renamed into place: a crash never leaves half an export behind.
    with atomic_dir(out_dir) as tmp:
        (tmp / "image").mkdir(parents=True)
        for i, rec in enumerate(records):
            image_id = _image_id(rec, i)
            if image_id in seen:
                raise DataError(f"{rec.get('where', world_data_jsonl)}: duplicate id {image_id!r}",
                                "give every row a unique 'id'")
            seen.add(image_id)
            reader.decode(rec).save(tmp / "image" / f"{image_id}.jpg", format="JPEG", quality=quality)
            annotations.append({"image_id": image_id, "caption": rec["caption"]})
        (tmp / "filter_cap.json").write_text(json.dumps({"annotations": annotations}, indent=1), encoding="utf-8")
    reader.close()
    return {"out": str(out_dir), "images": len(annotations), "source": str(world_data_jsonl)}
