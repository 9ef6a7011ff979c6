"""Deterministic medical-looking phantom scans with organ masks, lesion masks and boxes.

A phantom is a 2-D slice of one body part (brain, chest, abdomen) in the intensity style of one
modality (CT, MRI, X-Ray), with 0-2 lesions in one organ. Every attribute a question can ask about
follows from the pixels, so a model can learn the synthetic VQA task.

Sides follow the radiological convention: the patient's left is on the image's right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODALITIES = ("CT", "MRI", "X-Ray")
BODY_PARTS = ("Brain", "Chest", "Abdomen")
LESION_COUNT_PROBS = (0.45, 0.4, 0.15)  # P(0), P(1), P(2) lesions

# Organs a lesion may sit in, per body part; name -> (side or None).
LESION_ORGANS = {
    "Brain": ("Left Hemisphere", "Right Hemisphere"),
    "Chest": ("Left Lung", "Right Lung"),
    "Abdomen": ("Liver", "Left Kidney", "Right Kidney", "Spleen"),
}
LARGEST_ORGAN = {"Brain": "Brain", "Chest": "Lung", "Abdomen": "Liver"}

# Intensities in [0, 1] per modality and tissue; lesions differ per modality like real contrast does.
_STYLE = {
    "CT": dict(
        body=0.42,
        fat=0.30,
        bone=0.97,
        lung=0.06,
        liver=0.56,
        kidney=0.62,
        spleen=0.50,
        heart=0.50,
        brain=0.48,
        csf=0.30,
        lesion_solid=0.22,
        lesion_lung=0.62,
        noise=0.035,
        blur=0,
    ),
    "MRI": dict(
        body=0.34,
        fat=0.85,
        bone=0.08,
        lung=0.02,
        liver=0.28,
        kidney=0.52,
        spleen=0.40,
        heart=0.18,
        brain=0.58,
        csf=0.95,
        lesion_solid=0.92,
        lesion_lung=0.80,
        noise=0.05,
        blur=0,
    ),
    "X-Ray": dict(
        body=0.55,
        fat=0.50,
        bone=1.00,
        lung=0.18,
        liver=0.62,
        kidney=0.62,
        spleen=0.60,
        heart=0.72,
        brain=0.60,
        csf=0.55,
        lesion_solid=0.85,
        lesion_lung=0.78,
        noise=0.02,
        blur=2,
    ),
}


@dataclass
class Lesion:
    organ: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float


@dataclass
class Phantom:
    """One synthetic scan and everything that can be asked about it."""

    index: int
    modality: str
    body_part: str
    image: np.ndarray  # (H, W) uint8 grayscale
    organ_masks: dict[str, np.ndarray]  # organ name -> (H, W) bool
    lesions: list[Lesion] = field(default_factory=list)
    lesion_mask: np.ndarray | None = None  # (H, W) bool, union of lesions

    @property
    def lesion_count(self) -> int:
        return len(self.lesions)

    @property
    def lesion_organ(self) -> str | None:
        return self.lesions[0].organ if self.lesions else None

    @property
    def lesion_side(self) -> str | None:
        """Patient side of the lesions ("left"/"right"), None when central or absent."""
        if not self.lesions:
            return None
        organ = self.lesions[0].organ.lower()
        if organ.startswith("left"):
            return "left"
        if organ.startswith("right"):
            return "right"
        if organ == "liver":
            return "right"
        if organ == "spleen":
            return "left"
        return None

    def boxes(self) -> dict[str, tuple[int, int, int, int]]:
        """Organ and lesion boxes as (x, y, w, h) in pixels, SLAKE detection.json style."""
        out = {name: mask_to_box(mask) for name, mask in self.organ_masks.items() if mask.any()}
        if self.lesion_mask is not None and self.lesion_mask.any():
            out["Lesion"] = mask_to_box(self.lesion_mask)
        return out


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return img
    k = 2 * radius + 1
    padded = np.pad(img, radius, mode="edge")
    cs = padded.cumsum(0).cumsum(1)
    cs = np.pad(cs, ((1, 0), (1, 0)))
    h, w = img.shape
    return (cs[k : k + h, k : k + w] - cs[:h, k : k + w] - cs[k : k + h, :w] + cs[:h, :w]) / (k * k)


def make_phantom(
    index: int,
    *,
    seed: int = 0,
    size: int = 128,
    modality: str | None = None,
    body_part: str | None = None,
    lesion_count: int | None = None,
) -> Phantom:
    """Render phantom number ``index`` of the stream defined by ``seed`` (same inputs, same pixels)."""
    rng = np.random.default_rng([seed, index])
    modality = modality or MODALITIES[rng.integers(len(MODALITIES))]
    body_part = body_part or BODY_PARTS[rng.integers(len(BODY_PARTS))]
    if lesion_count is None:
        lesion_count = int(rng.choice(3, p=LESION_COUNT_PROBS))
    style = _STYLE[modality]
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    def jitter(scale: float) -> float:
        return 1.0 + rng.uniform(-scale, scale)

    cx, cy = s / 2 + rng.uniform(-0.03, 0.03) * s, s / 2 + rng.uniform(-0.03, 0.03) * s
    img = np.zeros((size, size), np.float32)
    organs: dict[str, np.ndarray] = {}

    if body_part == "Brain":
        rx, ry = 0.36 * s * jitter(0.06), 0.44 * s * jitter(0.06)
        skull = _ellipse(yy, xx, cx, cy, rx, ry)
        brain = _ellipse(yy, xx, cx, cy, rx * 0.88, ry * 0.9)
        img[skull] = style["bone"]
        img[brain] = style["brain"]
        ventricle = _ellipse(yy, xx, cx, cy, rx * 0.12, ry * 0.25)
        img[ventricle] = style["csf"]
        organs["Brain"] = brain
        # radiological convention: patient's left = image right
        organs["Left Hemisphere"] = brain & (xx >= cx) & ~ventricle
        organs["Right Hemisphere"] = brain & (xx < cx) & ~ventricle
    elif body_part == "Chest":
        rx, ry = 0.45 * s * jitter(0.05), 0.33 * s * jitter(0.06)
        body = _ellipse(yy, xx, cx, cy, rx, ry)
        img[body] = style["fat"]
        img[_ellipse(yy, xx, cx, cy, rx * 0.93, ry * 0.9)] = style["body"]
        lx = rx * 0.45
        left_lung = _ellipse(yy, xx, cx + lx, cy - 0.05 * s, rx * 0.34 * jitter(0.08), ry * 0.72)
        right_lung = _ellipse(yy, xx, cx - lx, cy - 0.05 * s, rx * 0.36 * jitter(0.08), ry * 0.72)
        img[left_lung | right_lung] = style["lung"]
        heart = _ellipse(yy, xx, cx + 0.06 * s, cy + 0.06 * s, rx * 0.22, ry * 0.33)
        img[heart] = style["heart"]
        spine = _ellipse(yy, xx, cx, cy + ry * 0.72, 0.05 * s, 0.05 * s)
        img[spine] = style["bone"]
        organs.update(
            {"Left Lung": left_lung & ~heart, "Right Lung": right_lung & ~heart, "Heart": heart, "Spinal Cord": spine}
        )
    else:  # Abdomen
        rx, ry = 0.44 * s * jitter(0.05), 0.34 * s * jitter(0.06)
        body = _ellipse(yy, xx, cx, cy, rx, ry)
        img[body] = style["fat"]
        img[_ellipse(yy, xx, cx, cy, rx * 0.92, ry * 0.9)] = style["body"]
        liver = _ellipse(yy, xx, cx - rx * 0.4, cy - ry * 0.18, rx * 0.42 * jitter(0.08), ry * 0.48)
        spleen = _ellipse(yy, xx, cx + rx * 0.55, cy - ry * 0.25, rx * 0.18, ry * 0.26)
        kid_r = _ellipse(yy, xx, cx - rx * 0.32, cy + ry * 0.45, rx * 0.13, ry * 0.22)
        kid_l = _ellipse(yy, xx, cx + rx * 0.32, cy + ry * 0.45, rx * 0.13, ry * 0.22)
        spine = _ellipse(yy, xx, cx, cy + ry * 0.62, 0.05 * s, 0.05 * s)
        img[liver] = style["liver"]
        img[spleen] = style["spleen"]
        img[kid_r | kid_l] = style["kidney"]
        img[spine] = style["bone"]
        organs.update(
            {"Liver": liver, "Spleen": spleen, "Right Kidney": kid_r, "Left Kidney": kid_l, "Spinal Cord": spine}
        )

    lesions: list[Lesion] = []
    lesion_mask = np.zeros((size, size), bool)
    if lesion_count:
        organ = LESION_ORGANS[body_part][rng.integers(len(LESION_ORGANS[body_part]))]
        region = organs[organ]
        is_lung = "Lung" in organ
        value = style["lesion_lung"] if is_lung else style["lesion_solid"]
        ys, xs = np.nonzero(region)
        for _ in range(lesion_count):
            radius = s * rng.uniform(0.065, 0.095) * (0.75 if organ.endswith("Kidney") or organ == "Spleen" else 1.0)
            # place the lesion where it fits inside the organ, apart from earlier lesions
            for _attempt in range(50):
                k = rng.integers(len(ys))
                lx, ly = float(xs[k]) + 0.5, float(ys[k]) + 0.5
                blob = _ellipse(yy, xx, lx, ly, radius, radius)
                inside = (blob & region).sum() / max(blob.sum(), 1)
                apart = all(np.hypot(lx - other.center[0], ly - other.center[1]) > 2.4 * radius for other in lesions)
                if inside > 0.8 and apart:
                    break
            blob &= region
            lesions.append(Lesion(organ=organ, center=(lx, ly), radius=radius))
            lesion_mask |= blob
            img[blob] = value

    img = _box_blur(img, style["blur"] * size // 128)
    img = img + rng.normal(0.0, style["noise"], img.shape).astype(np.float32)
    img = img * jitter(0.06)
    pixels = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Phantom(
        index=index,
        modality=modality,
        body_part=body_part,
        image=pixels,
        organ_masks=organs,
        lesions=lesions,
        lesion_mask=lesion_mask if lesions else None,
    )
