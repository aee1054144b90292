"""A real-photo smoke set: CC0 / public-domain photos shipped with scikit-image, captioned by us.

The captions live in `skimage_captions.json` (package data); the images are read from the installed
scikit-image (`pip install scikit-image`, part of `vpgtrans[real]`), so nothing is downloaded.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError

CAPTIONS_RESOURCE = "skimage_captions.json"


def skimage_data_dir() -> Path:
    """The `skimage/data` folder of the installed scikit-image (located without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the photo smoke set needs scikit-image, which is not installed",
                        "run `pip install scikit-image` (or `pip install -e .[real]`)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def photo_captions() -> list[dict[str, Any]]:
    """The caption table: one entry per photo with `file`, `licence` and `captions`."""
    text = importlib.resources.files("vpgtrans.data").joinpath(CAPTIONS_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)["photos"]


def read_photos(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Caption records {image, caption, captions, name, licence, where} for the scikit-image photos."""
    root = skimage_data_dir()
    table = photo_captions()
    wanted = set(names) if names is not None else None
    records = []
    for row in table:
        name = Path(row["file"]).stem
        if wanted is not None and name not in wanted and row["file"] not in wanted:
            continue
        path = root / row["file"]
        if not path.is_file():
            raise DataError(f"scikit-image photo {row['file']} is missing from {root}",
                            "reinstall scikit-image (`pip install --force-reinstall scikit-image`)")
        records.append({"image": str(path), "caption": row["captions"][0], "captions": list(row["captions"]),
                        "name": name, "licence": row["licence"], "where": f"{CAPTIONS_RESOURCE} {row['file']}"})
    if wanted is not None and len(records) < len(wanted):
        known = ", ".join(Path(r["file"]).stem for r in table)
        raise DataError(f"unknown photo name(s): {', '.join(sorted(wanted - {r['name'] for r in records}))}",
                        f"pick from: {known}")
    return records


def photo_path(name: str) -> Path:
    """Path of one captioned scikit-image photo by name (e.g. 'chelsea')."""
    return Path(read_photos([name])[0]["image"])


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records as JSONL (absolute image paths) so recipes can read them with `data.train=PATH`."""
    from ..checkpoint import atomic_write_text

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path
