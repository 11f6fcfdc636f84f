"""A federated DP imaging study over the formats hospital archives hold: a DICOM series with a
manifest (one corrupt file, which that site chose to skip), a PNG folder and a MedMNIST NPZ, run
through the real simulation: every site trains under its budget and the skipped file is reported."""

from __future__ import annotations

import csv
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file

from pm_common.audit.directories import audit_directory
from pm_common.audit.rules import EXIT_OK
from pm_common.data.synthetic_imaging import CLASSES, generate_federation, generate_site
from pm_common.study.config import study_from_dict
from simulations.runner import simulate
from simulations.scenarios import scenario_path

SITES = ("dicom-site", "png-site", "npz-site")


def _dicom_site(root: Path, patients: int = 20) -> None:
    """Two copies of pydicom's real CT slice per patient, half the patients labelled lesion, plus
    one file that is not DICOM at all."""
    ct = get_testdata_file("CT_small.dcm", download=False)
    assert ct is not None
    (root / "images").mkdir(parents=True)
    rows = [("images/broken.dcm", CLASSES[0], "P999")]
    (root / "images" / "broken.dcm").write_bytes(b"this is not a DICOM file")
    for p in range(patients):
        for k in range(2):
            name = f"images/p{p}_{k}.dcm"
            shutil.copy(ct, root / name)
            rows.append((name, CLASSES[p % 2], f"P{p:03d}"))
    with (root / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("file", "label", "patient_id"), *rows])


def _png_site(root: Path, n: int = 40) -> None:
    images, labels = generate_site(n, seed=5)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"scan{i}.png")


def _study(tmp_path: Path):  # type: ignore[no-untyped-def]
    _dicom_site(tmp_path / "dicom")
    _png_site(tmp_path / "png")
    (npz,) = generate_federation(tmp_path / "npz", num_sites=1, sizes=[60], seed=1)
    raw = tomllib.loads(scenario_path("imaging-synthetic").read_text(encoding="utf-8"))
    raw.pop("synthetic")
    raw["study"].update(rounds=2, min_report_count=5)
    raw["images"]["size"] = [32, 32]
    raw["training"].update(local_epochs=1, batch_size=8)
    raw["sites"] = [
        {"name": "dicom-site", "data": str(tmp_path / "dicom"), "format": "dicom",
         "on_bad_file": "skip"},
        {"name": "png-site", "data": str(tmp_path / "png"), "format": "folder"},
        {"name": "npz-site", "data": str(npz), "format": "npz"},
    ]
    return study_from_dict(raw, tmp_path)


def test_dicom_png_and_npz_sites_train_together_with_dp(tmp_path: Path) -> None:
    study = _study(tmp_path)
    out = tmp_path / "run"
    metrics = simulate(study, out)
    rounds = metrics["rounds"]
    assert len(rounds) == 3  # round 0: the initial model, then two rounds
    for r in (1, 2):
        assert sorted(rounds[r]["trained"]) == sorted(SITES)
        assert rounds[r]["files_skipped"] == {"dicom-site": 1}  # the site's choice, reported
        assert set(rounds[r]["sites"]) == set(SITES)  # every site evaluated the model it received
        assert all(0 <= m["balanced_accuracy"] <= 1 for m in rounds[r]["sites"].values())
    assert rounds[0]["files_skipped"] == {}
    summary = json.loads((out / "privacy" / "summary.json").read_text())
    for site in SITES:  # composed over both rounds, within the budget
        lines = (out / "privacy" / f"ledger-{site}.jsonl").read_text().splitlines()
        lines = [json.loads(line) for line in lines]
        assert [e["status"] for e in lines] == ["enrolled", "trained", "trained", "closed"]
        ledger = lines[1:3]
        assert [e["round"] for e in ledger] == [1, 2]
        assert 0 < ledger[0]["epsilon"] < ledger[1]["epsilon"] <= 8.0
        assert summary["sites"][site]["epsilon"] == ledger[1]["epsilon"]
    assert audit_directory(out).exit_code == EXIT_OK  # an independent recomputation agrees
    assert np.isfinite([m["loss"] for m in rounds[2]["sites"].values()]).all()
