"""A synthetic data set in the seed's layout, for the demo, the tests and the benchmarks.

``DIR/train_structured.jsonl`` + ``DIR/images/case_XX_YY.jpg``: clinical cases
with 1-6 photo-like JPEGs each, a user turn with the images and the symptoms,
an assistant turn with symptoms, diagnosis and key evidence, and ``meta`` as
the seed has it. With ``bad_lines=True`` it appends one broken record per
kind of problem shardkit must reject, and reports which line is which.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field

from shardkit.options import Options

CONDITIONS = [
    ("Contact dermatitis", "itchy red patches where a new watch strap sits", "sharp border matching the strap"),
    ("Psoriasis", "thick silvery plaques on both elbows", "Auspitz sign and nail pitting"),
    ("Tinea corporis", "a ring-shaped scaly rash that grows outward", "KOH preparation shows hyphae"),
    ("Herpes zoster", "burning pain then grouped blisters on one side of the chest", "dermatomal distribution"),
    ("Cellulitis", "a warm, swollen, tender lower leg with fever", "spreading erythema with raised CRP"),
    ("Urticaria", "raised itchy wheals that move within hours", "lesions resolve within 24 hours"),
    ("Impetigo", "honey-coloured crusts around the nose of a child", "culture grows Staphylococcus aureus"),
    ("Scabies", "night-time itching between the fingers", "burrows seen on dermoscopy"),
    ("Atopic eczema", "dry, itchy skin in the elbow and knee folds", "flexural pattern and personal history of asthma"),
    ("Erythema migrans", "an expanding red ring after a tick bite", "history of tick exposure and positive serology"),
    ("Basal cell carcinoma", "a pearly nodule on the nose that bleeds", "arborising vessels; biopsy confirms"),
    ("Rosacea", "facial flushing with papules but no comedones", "central face distribution and triggers"),
]


class DemoDataOptions(Options):
    """The options of ``shardkit demo-data``: how many cases, and their photos."""

    cases: int = Field(24, ge=1, description="number of cases")
    seed: int = Field(0, description="random seed")
    megapixels: tuple[float, float] = Field((0.3, 3.0), description="the smallest and the largest photo, in megapixels")
    images_per_case: tuple[int, int] = Field((1, 6), description="the fewest and the most photos of a case")
    bad_lines: bool = Field(False, description="append broken records (for trying validate and build)")


@dataclass
class SyntheticDataset:
    """Paths of a generated data set and which lines are good or deliberately bad."""

    root: Path
    jsonl: Path
    good_lines: list[int] = field(default_factory=list)
    bad_lines: dict[int, str] = field(default_factory=dict)  # line -> expected reject code


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A smooth, textured RGB picture that compresses like a photograph."""
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = None
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
    image.save(out, format="JPEG", quality=88, **({"exif": exif.tobytes()} if exif else {}))
    return out.getvalue()


def make_clinical_dataset(root: str | os.PathLike[str], **options: Any) -> SyntheticDataset:
    """Write the data set under ``root`` and describe it; ``options`` are :class:`DemoDataOptions`'."""
    demo = DemoDataOptions.create(**options)
    cases, seed, megapixels, images_per_case = demo.cases, demo.seed, demo.megapixels, demo.images_per_case
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    lines: list[bytes] = []
    dataset = SyntheticDataset(root, root / "train_structured.jsonl")
    for case in range(1, cases + 1):
        diagnosis, symptoms, evidence = pick.choice(CONDITIONS)
        used = []
        for index in range(1, pick.randint(*images_per_case) + 1):
            pixels = pick.uniform(*megapixels) * 1e6
            aspect = pick.uniform(0.6, 1.7)
            width, height = max(16, int((pixels * aspect) ** 0.5)), max(16, int((pixels / aspect) ** 0.5))
            name = f"images/case_{case:02d}_{index:02d}.jpg"
            orientation = 6 if pick.random() < 0.15 else None  # some phone photos are stored rotated
            (root / name).write_bytes(_jpeg(photo_like(width, height, rng), orientation))
            used.append(name)
        days = pick.randint(2, 30)
        user_text = f"Clinical case {case:02d}.\nSymptoms: {symptoms}, for {days} days.\nWhat is the diagnosis?"
        answer = f"Symptoms: {symptoms}.\n\nDiagnosis: {diagnosis}\n\nConfirmation/Key evidence: {evidence}."
        record = {
            "messages": [
                {
                    "role": "user",
                    "content": [*({"type": "image", "image": n} for n in used), {"type": "text", "text": user_text}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "meta": {
                "case_id": f"{case:02d}",
                "used_images": used,
                "symptoms": symptoms,
                "diagnosis": diagnosis,
                "confirmation": evidence,
            },
        }
        lines.append(json.dumps(record, ensure_ascii=False).encode())
        dataset.good_lines.append(len(lines))
        if case % 10 == 5:
            lines.append(b"")  # blank lines are skipped, not rejected
    if demo.bad_lines:
        for data, code in _bad_records(root):
            lines.append(data)
            dataset.bad_lines[len(lines)] = code
    dataset.jsonl.write_bytes(b"\n".join(lines) + b"\n")
    return dataset


def _record(*parts: dict, assistant: str = "Diagnosis: unknown.") -> bytes:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": assistant},
            ]
        }
    ).encode()


def _image(path: str) -> dict:
    return {"type": "image", "image": path}


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _bad_records(root: Path) -> list[tuple[bytes, str]]:
    images = root / "images"
    (images / "bad_empty.jpg").write_bytes(b"")
    good = _jpeg(photo_like(320, 240, np.random.default_rng(1)))
    (images / "bad_truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "bad_not_an_image.jpg").write_bytes(b"this is a text file with a .jpg name\n")
    (images / "bad_bomb.png").write_bytes(_png_declaring(60_000, 60_000))
    link = images / "bad_symlink_out.jpg"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink("../../outside-the-dataset.jpg", link)
    return [
        (b'{"messages": [{"role": "user", "content": "unclosed"', "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
        (json.dumps({"meta": {"case_id": "x"}}).encode(), "invalid_record"),  # no messages
        (
            json.dumps(
                {"messages": [{"role": "doctor", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
            ).encode(),
            "invalid_record",
        ),
        (_record({"type": "video", "video": "images/clip.mp4"}), "video_missing"),  # a clip that is not there
        (json.dumps({"messages": [{"role": "user", "content": "Is anyone there?"}]}).encode(), "no_answer"),
        (_record(_image("images/does_not_exist.jpg")), "image_missing"),
        (_record(_image("../outside.jpg")), "image_outside_root"),
        (_record(_image("/etc/hostname")), "image_outside_root"),
        (_record(_image("images/bad_symlink_out.jpg")), "image_outside_root"),
        (_record(_image("images/bad_empty.jpg")), "image_empty"),
        (_record(_image("images/bad_truncated.jpg")), "image_corrupt"),
        (_record(_image("images/bad_not_an_image.jpg")), "image_not_image"),
        (_record(_image("images/bad_bomb.png")), "image_too_large"),
    ]
