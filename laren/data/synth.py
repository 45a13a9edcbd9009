"""Procedural data sets with known generative factors (`laren data synth KIND DEST`): a prior can be trained and judged
on them with no download, and what a low-resolution input hides is known exactly.

``faces``: a face-like scene drawn with PIL at 4x the output size and reduced with Lanczos (antialiased). Eleven
factors, each drawn independently per sample from a generator seeded by (seed, index), so a set is a pure function of
its seed and each sample of its index:

    coarse layout  face_x, face_y (centre, fraction of the side), face_size (half-width), face_aspect (height / width),
                   skin (light .. dark), light (shading from the left -1 .. right +1), background (4 colours),
                   hair (4 colours)
    fine parts     eye_spacing (fraction of the face width), eye_color (blue, green, brown), mouth (smile, flat, open)

The fine parts are placed relative to the coarse layout (eyes and mouth move and scale with the face), and at 32 px
they are 1 to 3 pixels wide: a 4x4 or 8x8 input shows the face but not the eye colour or the mouth, which a prior
trained on the set can supply.

Shards are written by :func:`laren.data.pack.write_samples` (the writer of `laren data pack`): each sample is
``<key>.png``, ``<key>.json`` (source, index) and ``<key>.factors.json`` ({factor: value}; discrete factors as the
index into their ``values``); the manifest adds ``factors`` ([{name, kind, range | values}]), ``seed`` and ``kind``.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

from laren.data import pack, storage
from laren.data.pipeline import decode_image
from laren.data.shards import image_member, iter_tar_samples

SUPERSAMPLE = 4
KINDS = ("faces",)

FACE_FACTORS: list[dict[str, Any]] = [
    {"name": "face_x", "kind": "continuous", "range": [0.38, 0.62]},
    {"name": "face_y", "kind": "continuous", "range": [0.42, 0.62]},
    {"name": "face_size", "kind": "continuous", "range": [0.24, 0.34]},
    {"name": "face_aspect", "kind": "continuous", "range": [0.95, 1.3]},
    {"name": "skin", "kind": "continuous", "range": [0.0, 1.0]},
    {"name": "light", "kind": "continuous", "range": [-1.0, 1.0]},
    {"name": "background", "kind": "discrete", "values": ["slate", "olive", "sand", "plum"]},
    {"name": "hair", "kind": "discrete", "values": ["black", "brown", "blond", "red"]},
    {"name": "eye_spacing", "kind": "continuous", "range": [0.32, 0.52]},
    {"name": "eye_color", "kind": "discrete", "values": ["blue", "green", "brown"]},
    {"name": "mouth", "kind": "discrete", "values": ["smile", "flat", "open"]},
]

_BACKGROUND = [(70, 80, 100), (100, 110, 60), (190, 170, 120), (110, 70, 110)]
_HAIR = [(25, 20, 20), (100, 60, 30), (225, 195, 110), (180, 70, 30)]
_EYE = [(40, 110, 230), (40, 170, 60), (110, 60, 20)]
_SKIN_LIGHT, _SKIN_DARK = np.array([245, 205, 175]), np.array([120, 75, 50])


def factor_specs(kind: str) -> list[dict[str, Any]]:
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic data set kind {kind!r}; choose one of {', '.join(KINDS)}")
    return FACE_FACTORS


def sample_factors(kind: str, seed: int, index: int) -> dict[str, float | int]:
    """The factors of sample ``index`` of set ``seed``: each drawn independently (uniform on its range / values)."""
    rng = np.random.default_rng([int(seed), int(index)])
    out: dict[str, float | int] = {}
    for f in factor_specs(kind):
        if f["kind"] == "continuous":
            lo, hi = f["range"]
            out[f["name"]] = round(float(rng.uniform(lo, hi)), 6)
        else:
            out[f["name"]] = int(rng.integers(len(f["values"])))
    return out


def render_face(f: dict[str, float | int], resolution: int) -> Image.Image:
    """Draw the face scene of factors ``f`` at ``resolution`` (drawn at SUPERSAMPLE x, Lanczos-reduced)."""
    S = resolution * SUPERSAMPLE
    cx, cy = f["face_x"] * S, f["face_y"] * S
    rx = f["face_size"] * S
    ry = rx * f["face_aspect"]
    img = Image.new("RGB", (S, S), _BACKGROUND[f["background"]])
    d = ImageDraw.Draw(img)
    hair = _HAIR[f["hair"]]
    d.ellipse([cx - 1.12 * rx, cy - 1.18 * ry, cx + 1.12 * rx, cy + 0.55 * ry], fill=hair)  # hair behind the face
    skin = tuple(int(v) for v in _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * f["skin"])
    face = Image.new("L", (S, S), 0)
    ImageDraw.Draw(face).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    d.bitmap((0, 0), face, fill=skin)
    d.chord([cx - 1.02 * rx, cy - 1.1 * ry, cx + 1.02 * rx, cy - 0.15 * ry], 180, 360, fill=hair)  # fringe
    # eyes: white, iris (eye_color), pupil; placed and sized by the face
    ex, ey, er = f["eye_spacing"] * rx, cy + 0.05 * ry, 0.2 * rx
    for sx in (-1, 1):
        x = cx + sx * ex
        d.ellipse([x - er, ey - 0.75 * er, x + er, ey + 0.75 * er], fill=(250, 250, 250))
        d.ellipse([x - 0.65 * er, ey - 0.65 * er, x + 0.65 * er, ey + 0.65 * er], fill=_EYE[f["eye_color"]])
        d.ellipse([x - 0.25 * er, ey - 0.25 * er, x + 0.25 * er, ey + 0.25 * er], fill=(10, 10, 10))
    # mouth
    my, mw = cy + 0.55 * ry, 0.38 * rx
    lip, width = (150, 30, 40), max(1, int(0.07 * rx))
    if f["mouth"] == 0:
        d.arc([cx - mw, my - 0.5 * mw, cx + mw, my + 0.35 * mw], 20, 160, fill=lip, width=width)
    elif f["mouth"] == 1:
        d.line([cx - mw, my, cx + mw, my], fill=lip, width=width)
    else:
        d.ellipse([cx - 0.55 * mw, my - 0.35 * mw, cx + 0.55 * mw, my + 0.45 * mw], fill=(60, 10, 20))
    # lighting: a left-right ramp over the face and hair
    a = np.asarray(img).astype(np.float32)
    xs = (np.arange(S, dtype=np.float32) - cx) / (1.2 * rx)
    ramp = 1.0 + 0.35 * f["light"] * np.clip(xs, -1, 1)
    head = np.asarray(face, dtype=np.float32)[..., None] / 255.0
    a = a * (1 - head) + a * head * ramp[None, :, None]
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def _render(job: tuple) -> pack.Sample:
    kind, seed, index, resolution = job
    f = sample_factors(kind, seed, index)
    img = render_face(f, resolution)
    meta = {"source": f"synth:{kind}/{seed}/{index}", "index": index}
    return pack.Sample(index, pack.encode_image(img, "png", 95), meta,
                       extra={"factors.json": json.dumps(f, sort_keys=True).encode()})


def synth(kind: str, dest: str, resolution: int, count: int, seed: int = 0, name: Optional[str] = None,
          shard_size_mb: float = 64.0, workers: int = 0, progress: bool = True) -> pack.PackResult:
    """Render ``count`` samples of ``kind`` into shards + manifest at ``dest`` (local folder or s3://)."""
    specs = factor_specs(kind)
    name = name or f"synth-{kind}"
    pack.check_settings(name, resolution, "png", 95, shard_size_mb)
    if resolution < 16:
        raise ValueError(f"--resolution must be >= 16 for synthetic scenes, got {resolution}")
    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    settings = {"name": name, "resolution": resolution, "format": "png", "quality": None, "shard_size_mb": shard_size_mb,
                "source": f"synth:{kind}", "source_kind": "synth", "num_inputs": count, "kind": kind, "seed": seed,
                "factors": specs, "resize": f"rendered at {SUPERSAMPLE}R, PIL Lanczos to R"}

    def jobs(start: int) -> Iterator[tuple]:
        return ((kind, seed, i, resolution) for i in range(start, count))

    return pack.write_samples(dest, settings, jobs, _render, workers, progress)


def factor_matrix(specs: list[dict[str, Any]], rows: list[dict[str, float | int]]) -> np.ndarray:
    """Factor dicts -> (N, len(specs)) float32 in manifest order."""
    return np.array([[float(r[s["name"]]) for s in specs] for r in rows], dtype=np.float32).reshape(len(rows), len(specs))


def read_samples(url: str, limit: Optional[int] = None, member: str = "json"
                 ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """The first ``limit`` samples of a packed set in manifest order: (uint8 images (N, R, R, 3), each sample's
    ``<key>.<member>`` parsed as JSON, the manifest). Raises ValueError for a sample without that member."""
    m = pack.read_manifest(url)
    imgs, docs = [], []
    for entry in m["shards"]:
        with storage.open_read(storage.join(url, entry["name"])) as stream:
            for key, files, reason in iter_tar_samples(stream):
                if files is None:
                    raise ValueError(f"{url}/{entry['name']}: {key}: {reason}")
                img, reason = decode_image(image_member(files), m["resolution"])
                if img is None or member not in files:
                    raise ValueError(f"{url}/{entry['name']}: {key}: {reason or f'no {member} member'}")
                imgs.append(img)
                docs.append(json.loads(files[member]))
                if limit is not None and len(imgs) >= limit:
                    return np.stack(imgs), docs, m
    if not imgs:
        raise ValueError(f"{url}: the manifest lists no samples")
    return np.stack(imgs), docs, m


def read_factor_samples(url: str, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """The first ``limit`` samples of a synthetic set in manifest order: (uint8 images (N, R, R, 3), factors (N, F),
    factor specs). Raises ValueError for a set without factors."""
    specs = pack.read_manifest(url).get("factors")
    if not specs:
        raise ValueError(f"{url}: the manifest names no factors (not written by `laren data synth`)")
    imgs, rows, _ = read_samples(url, limit, member="factors.json")
    return imgs, factor_matrix(specs, rows), specs


__all__ = ["KINDS", "FACE_FACTORS", "factor_specs", "sample_factors", "render_face", "synth", "read_samples",
           "read_factor_samples", "factor_matrix"]
