"""Site image loading: real DICOM pixel maths, PNG folders, MedMNIST NPZ, splits, bad inputs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from pm_common.data.imaging import (
    ImageDataError,
    ImageSpec,
    load_image_site,
    split_train_test,
    window_to_unit,
)
from pm_common.data.synthetic_imaging import (
    CLASSES,
    default_site_sizes,
    generate_federation,
    generate_site,
)

BINARY = ["normal", "lesion"]


def _testdata(name: str) -> Path:
    """A DICOM file that ships inside pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} missing"
    return Path(path)


CT = _testdata("CT_small.dcm")  # 128x128, RescaleSlope 1, RescaleIntercept -1024, no window
MR = _testdata("MR_small.dcm")  # 64x64, no rescale, WindowCenter 600 / WindowWidth 1600


def _write_manifest(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "patient_id"])
        writer.writerows(rows)
    return manifest


def _dicom_site(root: Path, patients: int = 10, source: Path = CT) -> list[tuple[str, str, str]]:
    """`patients` patients with 2 images each, half of them labelled lesion."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(patients):
        for k in range(2):
            name = f"images/p{p}_{k}.dcm"
            shutil.copy(source, root / name)
            rows.append((name, BINARY[p % 2], f"P{p:03d}"))
    return rows


def _image_of(data, name: str) -> torch.Tensor:
    if name in data.train_ids:
        return data.train_x[data.train_ids.index(name)]
    return data.test_x[data.test_ids.index(name)]


# ------------------------------------------------------------------ DICOM pixel maths


def test_dicom_rescale_then_study_window_reaches_model_unchanged(tmp_path: Path) -> None:
    _write_manifest(tmp_path, _dicom_site(tmp_path))
    spec = ImageSpec(size=(128, 128), classes=BINARY)
    data = load_image_site(
        {"format": "dicom", "path": str(tmp_path), "window_center": 40, "window_width": 400}, spec
    )
    ds = pydicom.dcmread(CT)
    raw = ds.pixel_array.astype(np.float64)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert float(ds.RescaleIntercept) == -1024.0
    np.testing.assert_allclose(hu, raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    expected = np.clip((hu - (40 - 200)) / 400, 0.0, 1.0)
    got = _image_of(data, "images/p0_0.dcm")
    assert got.shape == (1, 128, 128) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-6)
    # Without the intercept the same window would give a visibly different image.
    assert np.abs(np.clip((raw + 160) / 400, 0, 1) - expected).mean() > 0.1
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64


def test_dicom_falls_back_to_file_window_then_min_max(tmp_path: Path) -> None:
    rows = _dicom_site(tmp_path, patients=5, source=CT) + [
        (f"mr{i}.dcm", BINARY[i % 2], f"M{i}") for i in range(5)
    ]
    for i in range(5):
        shutil.copy(MR, tmp_path / f"mr{i}.dcm")
    _write_manifest(tmp_path, rows)
    data = load_image_site(
        {"format": "dicom", "path": str(tmp_path)}, ImageSpec(size=(64, 64), classes=BINARY)
    )
    mr = pydicom.dcmread(MR)
    expected = window_to_unit(torch.from_numpy(apply_modality_lut(mr.pixel_array, mr)), 600, 1600)
    torch.testing.assert_close(_image_of(data, "mr0.dcm")[0], expected.float())
    ct = _image_of(data, "images/p0_0.dcm")  # no window in the file: min-max, then resized
    assert ct.shape == (1, 64, 64)
    assert 0.0 <= float(ct.min()) < 0.02 and 0.9 < float(ct.max()) <= 1.0


def test_dicom_resized_to_study_size_keeps_range_and_content(tmp_path: Path) -> None:
    _write_manifest(tmp_path, _dicom_site(tmp_path))
    source = {"format": "dicom", "path": str(tmp_path), "window_center": 40, "window_width": 400}
    native = load_image_site(source, ImageSpec(size=(128, 128), classes=BINARY))
    small = load_image_site(source, ImageSpec(size=(32, 48), classes=BINARY))
    assert small.train_x.shape[1:] == (1, 32, 48) and small.test_x.shape[1:] == (1, 32, 48)
    assert float(small.train_x.min()) >= 0.0 and float(small.train_x.max()) <= 1.0
    a, b = _image_of(native, "images/p0_0.dcm"), _image_of(small, "images/p0_0.dcm")
    assert abs(float(a.mean()) - float(b.mean())) < 0.02  # anti-aliased resize keeps the content


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    rows = _dicom_site(tmp_path, patients=5)
    ds = pydicom.dcmread(tmp_path / rows[0][0])
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / rows[0][0])
    _write_manifest(tmp_path, rows)
    source = {"format": "dicom", "path": str(tmp_path), "window_center": 40, "window_width": 400}
    data = load_image_site(source, ImageSpec(size=(128, 128), classes=BINARY))
    inverted, normal = _image_of(data, rows[0][0]), _image_of(data, rows[1][0])
    torch.testing.assert_close(inverted, 1.0 - normal)


def test_dicom_three_channels_replicates_gray_and_colour_needs_three(tmp_path: Path) -> None:
    rows = _dicom_site(tmp_path, patients=5)
    shutil.copy(_testdata("SC_ybr_full_422_uncompressed.dcm"), tmp_path / "colour.dcm")
    _write_manifest(tmp_path, [*rows, ("colour.dcm", "lesion", "C1")])
    source = {"format": "dicom", "path": str(tmp_path), "on_bad_file": "skip"}
    gray = load_image_site(source, ImageSpec(size=(64, 64), classes=BINARY))
    assert [name for name, _ in gray.skipped] == ["colour.dcm"]
    assert "colour" in gray.skipped[0][1] and "1 channel" in gray.skipped[0][1]
    rgb = load_image_site(source, ImageSpec(size=(64, 64), channels=3, classes=BINARY))
    assert rgb.skipped == [] and rgb.train_x.shape[1] == 3
    ct = _image_of(rgb, rows[0][0])
    torch.testing.assert_close(ct[0], ct[2])
    colour = _image_of(rgb, "colour.dcm")
    assert not torch.equal(colour[0], colour[2])  # real colour survives


# ------------------------------------------------------------------ splits


def test_patient_split_never_puts_a_patient_on_both_sides(tmp_path: Path) -> None:
    _write_manifest(tmp_path, _dicom_site(tmp_path, patients=12))
    spec = ImageSpec(size=(32, 32), classes=BINARY)
    data = load_image_site({"format": "dicom", "path": str(tmp_path), "seed": 3}, spec)
    assert data.train_patients is not None and data.test_patients is not None
    assert set(data.train_patients).isdisjoint(data.test_patients)
    assert len(set(data.train_patients) | set(data.test_patients)) == 12
    assert len(data.test_y) + len(data.train_y) == 24
    assert set(data.test_y.tolist()) == {0, 1}  # stratified: both classes in test
    summary = data.summary()
    assert summary["train"]["patients"] + summary["test"]["patients"] == 12
    assert summary["train"]["images"] == len(data.train_y)
    assert summary["skipped"] == 0 and "patient" in summary["split"]
    assert "P000" not in repr(summary)  # counts only: no patient ids leave the site


def test_split_is_seeded() -> None:
    labels = [i % 2 for i in range(40)]
    groups = [f"p{i // 2}" for i in range(40)]
    a = split_train_test(labels, 0.25, seed=1, groups=groups)
    b = split_train_test(labels, 0.25, seed=1, groups=groups)
    c = split_train_test(labels, 0.25, seed=2, groups=groups)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    train, test, how = split_train_test(labels, 0.25, seed=0)
    assert len(test) == 10 and sorted(np.concatenate([train, test]).tolist()) == list(range(40))
    assert np.mean([labels[i] for i in test]) == 0.5 and how == "stratified by label"


def test_too_few_patients_for_split_is_an_error(tmp_path: Path) -> None:
    _write_manifest(tmp_path, _dicom_site(tmp_path, patients=3))
    with pytest.raises(ImageDataError, match="at least 5 patients"):
        load_image_site(
            {"format": "dicom", "path": str(tmp_path)}, ImageSpec(size=(32, 32), classes=BINARY)
        )


# ------------------------------------------------------------------ bad DICOM inputs


def _site_with_bad_files(root: Path) -> list[tuple[str, str, str]]:
    rows = _dicom_site(root, patients=6)
    (root / "garbage.dcm").write_bytes(b"this is not a DICOM file" * 40)
    (root / "truncated.dcm").write_bytes(CT.read_bytes()[:4000])
    shutil.copy(_testdata("MR_truncated.dcm"), root / "mr_truncated.dcm")
    shutil.copy(_testdata("rtdose.dcm"), root / "volume.dcm")  # 15 frames
    shutil.copy(_testdata("rtplan.dcm"), root / "plan.dcm")  # no pixel data
    bad = ["garbage.dcm", "truncated.dcm", "mr_truncated.dcm", "missing.dcm", "volume.dcm"]
    bad.append("plan.dcm")
    return rows + [(name, "lesion", f"B{i}") for i, name in enumerate(bad)]


def test_bad_dicom_files_stop_lists_every_file_and_reason(tmp_path: Path) -> None:
    _write_manifest(tmp_path, _site_with_bad_files(tmp_path))
    spec = ImageSpec(size=(32, 32), classes=BINARY)
    with pytest.raises(ImageDataError) as err:
        load_image_site({"format": "dicom", "path": str(tmp_path)}, spec)
    message = str(err.value)
    reasons = dict(err.value.problems)
    assert set(reasons) == {
        "garbage.dcm",
        "truncated.dcm",
        "mr_truncated.dcm",
        "missing.dcm",
        "volume.dcm",
        "plan.dcm",
    }
    assert "not a DICOM file" in reasons["garbage.dcm"]
    assert "cannot be decoded" in reasons["mr_truncated.dcm"]
    assert reasons["missing.dcm"] == "file not found"
    assert "multi-frame" in reasons["volume.dcm"] and "15 frames" in reasons["volume.dcm"]
    assert "no pixel data" in reasons["plan.dcm"]
    for name, reason in reasons.items():
        assert f"{name}: {reason}" in message


def test_bad_dicom_files_skip_reports_them_and_keeps_the_rest(tmp_path: Path) -> None:
    _write_manifest(tmp_path, _site_with_bad_files(tmp_path))
    spec = ImageSpec(size=(32, 32), classes=BINARY)
    data = load_image_site({"format": "dicom", "path": str(tmp_path), "on_bad_file": "skip"}, spec)
    assert len(data.skipped) == 6 and all(reason for _, reason in data.skipped)
    assert len(data.train_y) + len(data.test_y) == 12
    assert data.summary()["skipped"] == 6


def test_unknown_dicom_label_names_file_and_label_even_when_skipping(tmp_path: Path) -> None:
    rows = _dicom_site(tmp_path, patients=6)
    rows[3] = (rows[3][0], "tumour", rows[3][2])
    _write_manifest(tmp_path, rows)
    with pytest.raises(ImageDataError, match=r"images/p1_1\.dcm: label 'tumour'"):
        load_image_site(
            {"format": "dicom", "path": str(tmp_path), "on_bad_file": "skip"},
            ImageSpec(size=(32, 32), classes=BINARY),
        )


def test_all_files_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"junk")
    _write_manifest(tmp_path, [("a.dcm", "normal", "P1"), ("b.dcm", "lesion", "P2")])
    with pytest.raises(ImageDataError, match="no usable images"):
        load_image_site(
            {"format": "dicom", "path": str(tmp_path), "on_bad_file": "skip"},
            ImageSpec(size=(32, 32), classes=BINARY),
        )


def test_manifest_problems_are_errors(tmp_path: Path) -> None:
    spec = ImageSpec(size=(32, 32), classes=BINARY)
    with pytest.raises(ImageDataError, match="manifest not found"):
        load_image_site({"format": "dicom", "path": str(tmp_path)}, spec)
    (tmp_path / "m.csv").write_text("file,label\na.dcm,normal\n")
    with pytest.raises(ImageDataError, match="patient_id"):
        load_image_site({"format": "dicom", "path": str(tmp_path), "manifest": "m.csv"}, spec)


# ------------------------------------------------------------------ PNG/JPEG folders


def _folder_site(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for label in BINARY:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
            image = Image.fromarray(array)
            if i % 3 == 0:
                image.save(root / label / f"{i}.png")
            elif i % 3 == 1:
                image.convert("L").save(root / label / f"{i}.PNG")
            else:
                image.save(root / label / f"{i}.jpg", quality=95)


def test_folder_loads_png_and_jpeg_as_grayscale(tmp_path: Path) -> None:
    _folder_site(tmp_path)
    data = load_image_site(
        {"format": "folder", "path": str(tmp_path), "seed": 1, "test_fraction": 0.5},
        ImageSpec(size=(24, 24), classes=BINARY),
    )
    assert data.train_x.shape[1:] == (1, 24, 24)
    assert len(data.train_y) + len(data.test_y) == 12 and data.train_patients is None
    summary = data.summary()
    assert (
        summary["train"]["per_class"] == summary["test"]["per_class"] == {"normal": 3, "lesion": 3}
    )
    assert float(data.train_x.min()) >= 0.0 and float(data.train_x.max()) <= 1.0


def test_folder_colour_to_gray_matches_pillow_and_16_bit_scales(tmp_path: Path) -> None:
    for label in BINARY:
        (tmp_path / label).mkdir()
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "normal" / "rgb.png")
    deep = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "lesion" / "deep.png")
    for label in BINARY:
        for i in range(2):
            Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / label / f"z{i}.png")
    data = load_image_site(
        {"format": "folder", "path": str(tmp_path), "test_fraction": 0.5},
        ImageSpec(size=(8, 8), classes=BINARY),
    )
    expected_gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)[0, 0] / 255
    assert float(_image_of(data, "normal/rgb.png").mean()) == pytest.approx(expected_gray)
    assert float(_image_of(data, "lesion/deep.png").mean()) == pytest.approx(32768 / 65535)
    colour = load_image_site(
        {"format": "folder", "path": str(tmp_path), "test_fraction": 0.5},
        ImageSpec(size=(8, 8), channels=3, classes=BINARY),
    )
    pixel = _image_of(colour, "normal/rgb.png")[:, 0, 0]
    torch.testing.assert_close(pixel, torch.tensor([200, 100, 50]) / 255.0)


def test_folder_bad_files_stop_and_skip(tmp_path: Path) -> None:
    _folder_site(tmp_path)
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    (tmp_path / "lesion" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    good = tmp_path / "lesion" / "0.png"
    (tmp_path / "lesion" / "cut.png").write_bytes(good.read_bytes()[:300])
    (tmp_path / "stray.png").write_bytes(good.read_bytes())
    spec = ImageSpec(size=(16, 16), classes=BINARY)
    with pytest.raises(ImageDataError) as err:
        load_image_site({"format": "folder", "path": str(tmp_path)}, spec)
    reasons = dict(err.value.problems)
    assert set(reasons) == {"normal/notes.txt", "lesion/broken.png", "lesion/cut.png", "stray.png"}
    assert "unsupported file type '.txt'" in reasons["normal/notes.txt"]
    assert "class sub-folder" in reasons["stray.png"]
    assert "lesion/cut.png: " in str(err.value)
    data = load_image_site({"format": "folder", "path": str(tmp_path), "on_bad_file": "skip"}, spec)
    assert sorted(name for name, _ in data.skipped) == sorted(reasons)
    assert len(data.train_y) + len(data.test_y) == 12


def test_folder_unknown_class_and_empty_folders_are_errors(tmp_path: Path) -> None:
    spec = ImageSpec(size=(16, 16), classes=BINARY)
    with pytest.raises(ImageDataError, match="not found"):
        load_image_site({"format": "folder", "path": str(tmp_path / "nope")}, spec)
    (tmp_path / "normal").mkdir()
    (tmp_path / "lesion").mkdir()
    with pytest.raises(ImageDataError, match="no image files"):
        load_image_site({"format": "folder", "path": str(tmp_path)}, spec)
    _folder_site(tmp_path / "site")
    (tmp_path / "site" / "tumour").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "site" / "tumour" / "x.png")
    with pytest.raises(ImageDataError, match=r"tumour/x\.png: label 'tumour'"):
        load_image_site(
            {"format": "folder", "path": str(tmp_path / "site"), "on_bad_file": "skip"}, spec
        )


# ------------------------------------------------------------------ MedMNIST NPZ


def _medmnist(path: Path, n: tuple[int, int, int] = (30, 6, 10), rgb: bool = False) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for part, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, 28, 28, 3) if rgb else (count, 28, 28)
        arrays[f"{part}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{part}_labels"] = (np.arange(count) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)


def test_npz_uses_its_own_split_and_merges_val(tmp_path: Path) -> None:
    _medmnist(tmp_path / "m.npz")
    spec = ImageSpec(size=(32, 32), classes=BINARY)
    data = load_image_site({"format": "npz", "path": "m.npz"}, spec, base_dir=tmp_path)
    assert data.train_x.shape == (36, 1, 32, 32) and data.test_x.shape == (10, 1, 32, 32)
    assert data.train_y.tolist()[:4] == [0, 1, 0, 1] and data.train_y.dtype == torch.int64
    raw = np.load(tmp_path / "m.npz")["test_images"][0] / 255.0
    assert float(data.test_x[0].mean()) == pytest.approx(raw.mean(), abs=0.01)
    only_train = load_image_site(
        {"format": "npz", "path": "m.npz", "npz_val": "ignore"}, spec, base_dir=tmp_path
    )
    assert len(only_train.train_y) == 30 and "val not used" in only_train.split


def test_npz_rgb_to_gray_and_bad_archives(tmp_path: Path) -> None:
    _medmnist(tmp_path / "rgb.npz", rgb=True)
    spec = ImageSpec(size=(28, 28), classes=BINARY)
    data = load_image_site({"format": "npz", "path": str(tmp_path / "rgb.npz")}, spec)
    assert data.train_x.shape[1] == 1
    three = ImageSpec(size=(28, 28), channels=3, classes=["a", "b", "c"])
    assert (
        load_image_site({"format": "npz", "path": str(tmp_path / "rgb.npz")}, three).train_x.shape[
            1
        ]
        == 3
    )

    arrays = dict(np.load(tmp_path / "rgb.npz"))
    arrays["train_labels"][3] = 7
    np.savez(tmp_path / "badlabel.npz", **arrays)
    with pytest.raises(ImageDataError, match=r"train\[3\] = 7"):
        load_image_site({"format": "npz", "path": str(tmp_path / "badlabel.npz")}, spec)
    arrays["train_labels"] = np.zeros((30, 14), dtype=np.uint8)
    np.savez(tmp_path / "multilabel.npz", **arrays)
    with pytest.raises(ImageDataError, match="single-label"):
        load_image_site({"format": "npz", "path": str(tmp_path / "multilabel.npz")}, spec)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ImageDataError, match="cannot be read"):
        load_image_site({"format": "npz", "path": str(tmp_path / "corrupt.npz")}, spec)
    np.savez(tmp_path / "partial.npz", train_images=arrays["train_images"])
    with pytest.raises(ImageDataError, match="lacks"):
        load_image_site({"format": "npz", "path": str(tmp_path / "partial.npz")}, spec)


def test_source_settings_are_checked() -> None:
    spec = ImageSpec(size=(8, 8), classes=BINARY)
    with pytest.raises(ImageDataError, match="unknown image source setting"):
        load_image_site({"format": "npz", "path": "x", "window_centre": 40}, spec)
    with pytest.raises(ImageDataError, match="together"):
        load_image_site({"format": "dicom", "path": "x", "window_center": 40}, spec)
    with pytest.raises(ImageDataError, match="format"):
        load_image_site({"format": "nifti", "path": "x"}, spec)
    with pytest.raises(ImageDataError, match="on_bad_file"):
        load_image_site({"format": "npz", "path": "x", "on_bad_file": "ignore"}, spec)
    with pytest.raises(ValueError, match="classes"):
        ImageSpec(size=(8, 8), classes=["only"])
    assert ImageSpec.from_mapping({"size": 64, "classes": BINARY}).size == (64, 64)


# ------------------------------------------------------------------ synthetic federation


def test_synthetic_site_is_seeded() -> None:
    a, la = generate_site(50, seed=7)
    b, lb = generate_site(50, seed=7)
    c, _ = generate_site(50, seed=8)
    assert a.dtype == np.uint8 and a.shape == (50, 64, 64) and la.shape == (50,)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_synthetic_federation_has_site_effects_and_loads(tmp_path: Path) -> None:
    sizes = [400, 250, 150, 100]
    paths = generate_federation(tmp_path, sizes=sizes, dirichlet_alpha=0.5, seed=0)
    again = generate_federation(tmp_path / "again", sizes=sizes, dirichlet_alpha=0.5, seed=0)
    assert [p.name for p in paths] == [f"site-{k}.npz" for k in range(1, 5)]
    assert (tmp_path / "again" / "site-2.npz").read_bytes() == again[1].read_bytes()
    assert paths[1].read_bytes() == again[1].read_bytes()
    readme = (tmp_path / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "not from patients" in readme.lower()
    spec = ImageSpec(size=(64, 64), classes=list(CLASSES))
    sites = [load_image_site({"format": "npz", "path": str(p)}, spec) for p in paths]
    assert [len(s.train_y) + len(s.test_y) for s in sites] == sizes  # val merged into train
    assert default_site_sizes(4) == [1000, 600, 360, 216]  # unequal by default
    lesion_share = [float(torch.cat([s.train_y, s.test_y]).float().mean()) for s in sites]
    assert max(lesion_share) - min(lesion_share) > 0.2  # label skew
    # Scanner effects: tissue intensity (pixels inside the body) differs between sites.
    tissue = [float(s.train_x[s.train_x > 0.15].mean()) for s in sites]
    assert max(tissue) - min(tissue) > 0.05
    # Background noise level differs too (corner patches are air plus scanner noise).
    noise = [float(s.train_x[:, :, :6, :6].std()) for s in sites]
    assert max(noise) / min(noise) > 1.3
