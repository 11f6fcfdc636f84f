"""Loading and validating one hospital site's image data for federated training.

A site's images arrive in one of three layouts, chosen by the `format` key of a study TOML table:

* ``dicom``: a CSV manifest (columns ``file``, ``label``, ``patient_id``; ``file`` relative to the
  manifest) of single-frame DICOM files. Pixel values go through the file's modality LUT
  (RescaleSlope/RescaleIntercept, e.g. to Hounsfield units), then a window (the study/site's
  ``window_center``/``window_width``, else the file's own WindowCenter/WindowWidth, else the
  image's min-max) onto [0, 1]. Multi-frame files are rejected as bad files, not silently cut to
  one frame: a volume handed to a 2-D model is almost always a mistake in the export.
  Colour DICOM (RGB/YBR) is accepted only when the study asks for 3 channels; PALETTE COLOR and
  other photometric interpretations are bad files.
* ``folder``: PNG/JPEG files, one sub-folder per class (the folder name is the label).
  8-bit images are scaled by 1/255, 16-bit grayscale PNGs by 1/65535 (absolute intensities are
  kept, not min-max'ed per image). With ``channels = 1`` colour images become luminance (Pillow).
* ``npz``: the MedMNIST layout. Its own train/test split is kept (``test_fraction`` is unused);
  the ``val`` split is merged into train by default (``npz_val = "ignore"`` drops it), since in a
  federation model selection happens centrally, not on each site's val set.

Train/test splits are by patient when patient ids exist (DICOM), so no patient is on both sides,
and stratified by label otherwise. Every bad file is collected with its reason: ``on_bad_file =
"stop"`` (default) raises :class:`ImageDataError` listing them all, ``"skip"`` leaves them out and
reports them in :attr:`ImageSiteData.skipped`. Nothing is skipped silently.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pm_common.study.schema import AnyOf, Choice, InputError, Integer, Items, Rule, Text, check_table

FORMATS = ("dicom", "folder", "npz")
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SOURCE_KEYS = frozenset(
    {
        "format",
        "path",
        "manifest",
        "window_center",
        "window_width",
        "test_fraction",
        "seed",
        "on_bad_file",
        "npz_val",
    }
)
_MANIFEST_COLUMNS = ("file", "label", "patient_id")


class ImageDataError(ValueError):
    """A site's image data cannot be used as configured; `problems` holds (file, reason) pairs."""

    def __init__(self, message: str, problems: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = list(problems)


class _BadFile(Exception):
    """One file that cannot be used; collected, never raised past the loader."""


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """What the study's model expects: every site's images are made to fit this."""

    size: tuple[int, int]
    channels: int = 1
    classes: list[str]

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"ImageSpec.size must be (height, width) > 0, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"ImageSpec.channels must be 1 or 3, got {self.channels}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"ImageSpec.classes needs >= 2 distinct names, got {self.classes}")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], place: str = "[images]") -> ImageSpec:
        """Build from a study TOML table: `size = [H, W]` (or one int), `channels`, `classes`.

        Raises:
            InputError: listing every problem of the table, one line each, named `[images].key`.
        """
        problems: list[str] = []
        values = check_table(table, IMAGE_SPEC_RULES, place, problems, required=("size", "classes"))
        if values is None or problems:
            raise InputError(problems)
        size = values["size"]
        return cls(
            size=(size, size) if isinstance(size, int) else (size[0], size[1]),
            channels=values.get("channels", 1),
            classes=[str(c) for c in values["classes"]],
        )


MIN_IMAGE_SIDE = 16  # the smallest input SmallCNN takes (pm_common.models.images)
MAX_IMAGE_SIDE = 1024  # pixels per side: beyond this a DP-SGD step's per-sample gradients do not fit
MAX_CLASSES = 1000
_SIDE = Integer(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)
IMAGE_SPEC_RULES: dict[str, Rule] = {
    "size": AnyOf((_SIDE, Items(_SIDE, 2, 2)), f"an integer from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE}, or "
                  f"[height, width] of two such integers"),
    "channels": Choice((1, 3)),
    "classes": Items(Text(max_length=100), 2, MAX_CLASSES, unique=True),
}


@dataclass(frozen=True)
class SourceSettings:
    """The parsed, checked source table; unknown keys are refused so typos cannot go unnoticed."""

    format: Literal["dicom", "folder", "npz"]
    path: Path
    manifest: Path | None = None
    window_center: float | None = None
    window_width: float | None = None
    test_fraction: float = 0.2
    seed: int = 0
    on_bad_file: Literal["stop", "skip"] = "stop"
    npz_val: Literal["train", "ignore"] = "train"

    @classmethod
    def from_mapping(
        cls, source: Mapping[str, Any], base_dir: Path | None = None
    ) -> SourceSettings:
        """Check `source`; relative paths resolve against `base_dir` (the study file's folder)."""
        unknown = sorted(set(source) - _SOURCE_KEYS)
        if unknown:
            raise ImageDataError(
                f"unknown image source setting(s) {unknown}; allowed: {sorted(_SOURCE_KEYS)}"
            )
        fmt = source.get("format")
        if fmt not in FORMATS:
            raise ImageDataError(f"image source format must be one of {FORMATS}, got {fmt!r}")
        if "path" not in source:
            raise ImageDataError("image source needs a `path`")
        base = base_dir or Path.cwd()
        path = _resolve(Path(str(source["path"])), base)
        manifest: Path | None = None
        if fmt == "dicom":
            if "manifest" in source:
                manifest = _resolve(Path(str(source["manifest"])), path)
            elif path.suffix.lower() == ".csv":
                manifest = path
            else:
                manifest = path / "manifest.csv"
        center, width = source.get("window_center"), source.get("window_width")
        if (center is None) != (width is None):
            raise ImageDataError("window_center and window_width must be given together")
        if width is not None and float(width) <= 0:
            raise ImageDataError(f"window_width must be > 0, got {width}")
        test_fraction = float(source.get("test_fraction", 0.2))
        if not 0.0 < test_fraction < 1.0:
            raise ImageDataError(f"test_fraction must be in (0, 1), got {test_fraction}")
        on_bad = source.get("on_bad_file", "stop")
        if on_bad not in ("stop", "skip"):
            raise ImageDataError(f'on_bad_file must be "stop" or "skip", got {on_bad!r}')
        npz_val = source.get("npz_val", "train")
        if npz_val not in ("train", "ignore"):
            raise ImageDataError(f'npz_val must be "train" or "ignore", got {npz_val!r}')
        return cls(
            format=fmt,
            path=path,
            manifest=manifest,
            window_center=None if center is None else float(center),
            window_width=None if width is None else float(width),
            test_fraction=test_fraction,
            seed=int(source.get("seed", 0)),
            on_bad_file=on_bad,
            npz_val=npz_val,
        )


@dataclass
class ImageSiteData:
    """One site's tensors, ready for a DataLoader; ids/patients stay on site (never in summary)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    format: str
    split: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    train_ids: list[str] = field(default_factory=list)
    test_ids: list[str] = field(default_factory=list)
    train_patients: list[str] | None = None
    test_patients: list[str] | None = None

    def summary(self) -> dict[str, Any]:
        """Counts only (no pixels, no ids): safe to log or send to the server."""

        def part(y: torch.Tensor, patients: list[str] | None) -> dict[str, Any]:
            counts = Counter(int(v) for v in y.tolist())
            return {
                "images": len(y),
                "per_class": {c: counts.get(i, 0) for i, c in enumerate(self.classes)},
                "patients": None if patients is None else len(set(patients)),
            }

        return {
            "format": self.format,
            "split": self.split,
            "classes": list(self.classes),
            "image_shape": list(self.train_x.shape[1:]),
            "train": part(self.train_y, self.train_patients),
            "test": part(self.test_y, self.test_patients),
            "skipped": len(self.skipped),
        }


# ---------------------------------------------------------------- pure maths


def window_to_unit(values: torch.Tensor, center: float, width: float) -> torch.Tensor:
    """Map the window [center - width/2, center + width/2] linearly onto [0, 1], clipping outside.

    The plain linear window, not DICOM's `c - 0.5, w - 1` variant: they differ by under 1/width,
    and this one is what study authors mean when they write e.g. a lung window (-600, 1500).
    """
    low = center - width / 2.0
    return ((values - low) / width).clamp(0.0, 1.0)


def min_max_to_unit(values: torch.Tensor) -> torch.Tensor:
    """Scale an image's own range onto [0, 1]; a constant image becomes all zeros."""
    low, high = values.min(), values.max()
    if float(high - low) <= 0.0:
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize C×H×W (or N×C×H×W) to `size` with anti-aliased bilinear (torch), staying in [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    out = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
    out = out.clamp(0.0, 1.0)
    return out if image.dim() == 4 else out.squeeze(0)


def split_train_test(
    labels: Sequence[int],
    test_fraction: float,
    seed: int,
    groups: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Seeded train/test indices; by patient when `groups` is given. Returns (train, test, how).

    Grouped: StratifiedGroupKFold with k = round(1 / test_fraction) folds, first fold is test, so
    the test share is 1/k (e.g. 0.2 -> 5 folds) and no patient is on both sides. Ungrouped:
    stratified by label when every class has >= 2 images, plain seeded shuffle otherwise.
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    y = np.asarray(labels)
    if len(y) < 2:
        raise ImageDataError(f"need at least 2 images for a train/test split, found {len(y)}")
    index = np.arange(len(y))
    if groups is not None:
        n_splits = max(2, round(1.0 / test_fraction))
        n_groups = len(set(groups))
        if n_groups < n_splits:
            raise ImageDataError(
                f"a patient-level split with test_fraction={test_fraction} needs at least "
                f"{n_splits} patients, found {n_groups}"
            )
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train, test = next(folds.split(index, y, groups=np.asarray(groups)))
        return train, test, f"patient-grouped, stratified (1/{n_splits} of patients in test)"
    counts = Counter(y.tolist())
    n_test = math.ceil(test_fraction * len(y))
    stratify = (
        min(counts.values()) >= 2 and n_test >= len(counts) and len(y) - n_test >= len(counts)
    )
    train, test = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=y if stratify else None
    )
    return np.sort(train), np.sort(test), "stratified by label" if stratify else "random (seeded)"


# ---------------------------------------------------------------- per-file readers


def read_dicom_image(
    path: Path,
    channels: int,
    window: tuple[float, float] | None = None,
) -> torch.Tensor:
    """One DICOM file to C×H×W float32 in [0, 1] (modality LUT, then window); raises _BadFile."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels.processing import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise _BadFile(f"not a DICOM file ({exc})") from exc
    except Exception as exc:
        raise _BadFile(f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _BadFile(f"no pixel data (SOP class {ds.get('SOPClassUID', 'unknown')})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise _BadFile(f"multi-frame DICOM ({frames} frames); export one 2-D frame per file")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise _BadFile(f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if photometric in ("MONOCHROME1", "MONOCHROME2") and pixels.ndim == 2:
        values = torch.from_numpy(np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64))
        if window is None:
            window = _file_window(ds)
        image = min_max_to_unit(values) if window is None else window_to_unit(values, *window)
        if photometric == "MONOCHROME1":  # MONOCHROME1 displays low values bright: invert
            image = 1.0 - image
        image = image.unsqueeze(0).repeat(channels, 1, 1)
    elif photometric.startswith(("RGB", "YBR")) and pixels.ndim == 3 and pixels.shape[-1] == 3:
        if channels != 3:
            raise _BadFile(f"colour DICOM ({photometric}) but the study expects 1 channel")
        max_value = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        image = torch.from_numpy(pixels.astype(np.float64) / max_value).permute(2, 0, 1)
    else:
        raise _BadFile(f"unsupported photometric interpretation {photometric or 'missing'!r}")
    return image.clamp(0.0, 1.0).float()


def _file_window(ds: Any) -> tuple[float, float] | None:
    """The file's first WindowCenter/WindowWidth pair (they may be multi-valued), if usable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0]) if isinstance(center, Sequence) else float(center)
        w = float(width[0]) if isinstance(width, Sequence) else float(width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if w > 0 else None


def read_picture(path: Path, channels: int) -> torch.Tensor:
    """One PNG/JPEG to C×H×W float32 in [0, 1]; raises _BadFile for what Pillow cannot decode."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode now so truncated files fail here, not in training
            if im.mode in ("I;16", "I;16L", "I;16B"):
                array = np.asarray(im, dtype=np.float64) / 65535.0
                gray = torch.from_numpy(array).unsqueeze(0)
                return gray.repeat(channels, 1, 1).float()
            if im.mode in ("I", "F"):
                raise _BadFile(f"unsupported image mode {im.mode} (32-bit); save as 8/16-bit")
            # Camera pictures (e.g. dermatology) may be stored rotated with an EXIF tag.
            upright = ImageOps.exif_transpose(im)
            converted = upright.convert("L" if channels == 1 else "RGB")
            scaled = np.asarray(converted, dtype=np.float32) / 255.0
    except _BadFile:
        raise
    except UnidentifiedImageError as exc:
        raise _BadFile("not a readable image (Pillow cannot identify it)") from exc
    except Exception as exc:
        raise _BadFile(f"image cannot be decoded ({type(exc).__name__}: {exc})") from exc
    tensor = torch.from_numpy(scaled)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- entry point


def load_image_site(
    source: Mapping[str, Any], spec: ImageSpec, *, base_dir: Path | None = None
) -> ImageSiteData:
    """Load, validate and split one site's images as `source` (a study TOML table) describes."""
    settings = SourceSettings.from_mapping(source, base_dir)
    if settings.format == "npz":
        return _load_npz(settings, spec)
    if settings.format == "dicom":
        records, root = _dicom_records(settings, spec)
        window = (
            None
            if settings.window_center is None or settings.window_width is None
            else (settings.window_center, settings.window_width)
        )

        def reader(p: Path) -> torch.Tensor:
            return read_dicom_image(p, spec.channels, window)

    else:
        records, root = _folder_records(settings, spec)

        def reader(p: Path) -> torch.Tensor:
            return read_picture(p, spec.channels)

    images: list[torch.Tensor] = []
    kept: list[_Record] = []
    bad: list[tuple[str, str]] = []
    for rec in records:
        if rec.problem is not None:
            bad.append((rec.name, rec.problem))
            continue
        try:
            images.append(resize_image(reader(rec.path), spec.size))
            kept.append(rec)
        except _BadFile as exc:
            bad.append((rec.name, str(exc)))
    if bad and settings.on_bad_file == "stop":
        raise ImageDataError(_bad_file_message(bad, root), bad)
    if not kept:
        why = f" ({len(bad)} bad file(s) skipped)" if bad else ""
        raise ImageDataError(f"no usable images at {root}{why}", bad)
    labels = [spec.classes.index(r.label) for r in kept]
    patients = [r.patient for r in kept] if settings.format == "dicom" else None
    train, test, how = split_train_test(labels, settings.test_fraction, settings.seed, patients)
    x = torch.stack(images)
    y = torch.tensor(labels, dtype=torch.int64)
    names = [r.name for r in kept]
    return ImageSiteData(
        train_x=x[torch.from_numpy(train)],
        train_y=y[torch.from_numpy(train)],
        test_x=x[torch.from_numpy(test)],
        test_y=y[torch.from_numpy(test)],
        classes=list(spec.classes),
        format=settings.format,
        split=how,
        skipped=bad,
        train_ids=[names[i] for i in train],
        test_ids=[names[i] for i in test],
        train_patients=None if patients is None else [patients[i] for i in train],
        test_patients=None if patients is None else [patients[i] for i in test],
    )


@dataclass
class _Record:
    name: str
    path: Path
    label: str
    patient: str = ""
    problem: str | None = None


def _resolve(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


def _bad_file_message(bad: Sequence[tuple[str, str]], root: Path) -> str:
    lines = [f"  - {name}: {reason}" for name, reason in bad]
    return (
        f'{len(bad)} bad image file(s) under {root} (on_bad_file = "stop"; fix them, or set '
        f'on_bad_file = "skip" to leave them out and report them):\n' + "\n".join(lines)
    )


def _unknown_labels_error(
    unknown: Sequence[tuple[str, str]], classes: Sequence[str]
) -> ImageDataError:
    lines = [f"  - {name}: label {label!r}" for name, label in unknown]
    return ImageDataError(
        f"{len(unknown)} image(s) with labels not among the study classes {list(classes)}:\n"
        + "\n".join(lines),
        [(name, f"unknown label {label!r}") for name, label in unknown],
    )


def _dicom_records(settings: SourceSettings, spec: ImageSpec) -> tuple[list[_Record], Path]:
    """Rows of the manifest as records; missing files and patient ids become per-file problems."""
    manifest = settings.manifest
    assert manifest is not None
    if not manifest.is_file():
        raise ImageDataError(f"DICOM manifest not found: {manifest}")
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in _MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ImageDataError(
                    f"manifest {manifest} lacks column(s) {missing}; "
                    f"needs {list(_MANIFEST_COLUMNS)}"
                )
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ImageDataError(f"manifest {manifest} cannot be read: {exc}") from exc
    if not rows:
        raise ImageDataError(f"manifest {manifest} lists no images")
    root = manifest.parent
    records: list[_Record] = []
    unknown: list[tuple[str, str]] = []
    for row in rows:
        name = (row.get("file") or "").strip()
        label = (row.get("label") or "").strip()
        path = _resolve(Path(name), root)
        rec = _Record(
            name=name, path=path, label=label, patient=(row.get("patient_id") or "").strip()
        )
        if label not in spec.classes:
            unknown.append((name, label))
        if not name:
            rec.problem = "empty `file` cell in manifest"
        elif not path.is_file():
            rec.problem = "file not found"
        elif not rec.patient:
            rec.patient = _dicom_patient_id(path)
            if not rec.patient:
                rec.problem = "no patient id (empty in manifest and no DICOM PatientID)"
        records.append(rec)
    if unknown:
        raise _unknown_labels_error(unknown, spec.classes)
    return records, root


def _dicom_patient_id(path: Path) -> str:
    """The file's PatientID, used only when the manifest cell is empty; '' if absent."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:
        return ""  # the read proper will report why the file is bad
    return str(ds.get("PatientID", "") or "").strip()


def _folder_records(settings: SourceSettings, spec: ImageSpec) -> tuple[list[_Record], Path]:
    """One record per file under class sub-folders; wrong extensions are per-file problems."""
    root = settings.path
    if not root.is_dir():
        raise ImageDataError(f"image folder not found: {root}")
    records: list[_Record] = []
    unknown: list[tuple[str, str]] = []
    for entry in sorted(root.iterdir()):
        if entry.is_file():
            records.append(_Record(entry.name, entry, "", problem="not inside a class sub-folder"))
            continue
        for file in sorted(p for p in entry.rglob("*") if p.is_file()):
            name = file.relative_to(root).as_posix()
            if entry.name not in spec.classes:
                unknown.append((name, entry.name))
                continue
            rec = _Record(name, file, entry.name)
            if file.suffix.lower() not in FOLDER_EXTENSIONS:
                rec.problem = f"unsupported file type {file.suffix or '(none)'!r}; use PNG or JPEG"
            records.append(rec)
    if unknown:
        raise _unknown_labels_error(unknown, spec.classes)
    if not records:
        raise ImageDataError(f"image folder {root} has no image files in class sub-folders")
    return records, root


def _load_npz(settings: SourceSettings, spec: ImageSpec) -> ImageSiteData:
    """A MedMNIST-layout archive: its own train/test split, val merged into train or dropped."""
    path = settings.path
    if not path.is_file():
        raise ImageDataError(f"NPZ file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise ImageDataError(
            f"NPZ file {path} cannot be read ({type(exc).__name__}: {exc})", [(path.name, str(exc))]
        ) from exc
    required = ("train_images", "train_labels", "test_images", "test_labels")
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ImageDataError(f"NPZ file {path} lacks {missing} (MedMNIST layout expected)")
    parts = (
        ["train", "val"] if settings.npz_val == "train" and "val_images" in arrays else ["train"]
    )
    train_x = torch.cat([_npz_images(arrays, p, spec, path) for p in parts])
    train_y = torch.cat([_npz_labels(arrays, p, spec, path) for p in parts])
    test_x = _npz_images(arrays, "test", spec, path)
    test_y = _npz_labels(arrays, "test", spec, path)
    if len(train_y) == 0:
        raise ImageDataError(f"NPZ file {path} has no training images")
    merged = "val merged into train" if "val" in parts else "val not used"
    return ImageSiteData(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=list(spec.classes),
        format="npz",
        split=f"the file's own train/test split ({merged})",
        train_ids=[
            f"{path.name}:{p}[{i}]" for p in parts for i in range(len(arrays[f"{p}_labels"]))
        ],
        test_ids=[f"{path.name}:test[{i}]" for i in range(len(test_y))],
    )


def _npz_images(
    arrays: Mapping[str, np.ndarray], part: str, spec: ImageSpec, path: Path
) -> torch.Tensor:
    """(N,H,W) or (N,H,W,C) uint8 -> N×C×H×W float in [0, 1] at the study size."""
    images = arrays[f"{part}_images"]
    where = f"{path.name}:{part}_images"
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ImageDataError(f"{where} has shape {images.shape}; expected (N,H,W) or (N,H,W,C)")
    if images.dtype != np.uint8:
        raise ImageDataError(f"{where} has dtype {images.dtype}; MedMNIST images are uint8")
    if images.shape[-1] == 3 and spec.channels == 1:
        from PIL import Image

        images = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images])[
            ..., None
        ]
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if tensor.shape[1] == 1 and spec.channels == 3:
        tensor = tensor.repeat(1, 3, 1, 1)
    if len(tensor) == 0:
        return tensor.new_zeros((0, spec.channels, *spec.size))
    return resize_image(tensor, spec.size).contiguous()


def _npz_labels(
    arrays: Mapping[str, np.ndarray], part: str, spec: ImageSpec, path: Path
) -> torch.Tensor:
    """(N,) or (N,1) integer class indices, each checked against the study's classes."""
    labels = arrays[f"{part}_labels"]
    where = f"{path.name}:{part}_labels"
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ImageDataError(
            f"{where} has shape {labels.shape}; only single-label (N,) or (N,1) is supported"
        )
    if len(labels) != len(arrays[f"{part}_images"]):
        raise ImageDataError(
            f"{where}: {len(labels)} labels for {len(arrays[f'{part}_images'])} images"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ImageDataError(f"{where} has dtype {labels.dtype}; expected integer class indices")
    bad = np.flatnonzero((labels < 0) | (labels >= len(spec.classes)))
    if bad.size:
        shown = [(f"{part}[{i}]", str(int(labels[i]))) for i in bad[:20]]
        raise ImageDataError(
            f"{where}: {bad.size} label(s) outside the study's {len(spec.classes)} classes "
            f"{list(spec.classes)}, e.g. " + ", ".join(f"{n} = {v}" for n, v in shown),
            [(f"{path.name}:{n}", f"unknown label {v}") for n, v in shown],
        )
    return torch.from_numpy(labels.astype(np.int64))
