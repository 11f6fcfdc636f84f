"""How the built-in task data sets were made (run once when vendoring; nothing reads this at run time).

    python -m pm_common.datasets.vendor_task_data /path/to/fed_tcga_brca

- tcga_brca/: FLamby's Fed-TCGA-BRCA, one train and one test file per region (FLamby's `fold2`
  split, train_K / test_K), columns as in FLamby's brca.csv. The 12 patients followed for 0 days
  (all censored at time 0) are left out: pmfl refuses survival times <= 0, and a patient censored at
  0 adds nothing to the likelihood nor to any comparable pair of Harrell's C-index, so FLamby's
  test-set C-index is unchanged by leaving them out.
- diabetes/: scikit-learn's diabetes-progression data (load_diabetes(scaled=False)), split into 3
  sites by age tertile (site 1: the youngest third, cut points the 1/3 and 2/3 quantiles of age).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).parent


def vendor_tcga(source: Path) -> None:
    """Per-region train/test CSVs from FLamby's files (see the module docstring)."""
    data = pd.read_csv(source / "brca.csv").merge(pd.read_csv(source / "train_test_split.csv"), on="pid")
    data = data[data["T"] > 0]
    for fold, rows in data.groupby("fold2"):
        part, region = str(fold).split("_")
        rows.drop(columns=["fold", "fold2"]).to_csv(HERE / "tcga_brca" / f"region_{region}_{part}.csv",
                                                   index=False)


def vendor_diabetes() -> None:
    """Three sites by age tertile (see the module docstring)."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True, scaled=False).frame
    frame = frame.rename(columns={"target": "progression"})
    cuts = np.quantile(frame["age"], [1 / 3, 2 / 3])
    site = np.searchsorted(cuts, frame["age"], side="right")
    for k in range(3):
        frame[site == k].to_csv(HERE / "diabetes" / f"site_{k + 1}.csv", index=False)


if __name__ == "__main__":
    vendor_tcga(Path(sys.argv[1]))
    vendor_diabetes()
