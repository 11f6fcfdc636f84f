"""The tabular data contract: every bad input gets an error naming the file, the row and the column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pm_common.data.contract import ContractError, contract_from_dict
from pm_common.data.tabular import DataValidationError, load_site_table, split_train_test
from pm_common.study.config import StudyConfigError, load_study
from tests.conftest import HEART

CONTRACT = load_study(HEART).contract
CLEVELAND = HEART.parent.parent.parent / "pm_common/datasets/heart_disease/cleveland.csv"
HEADER = "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num"
GOOD_ROW = (
    "1,63,Male,Cleveland,typical angina,145,233,TRUE,lv hypertrophy,150,FALSE,2.3,downsloping,0,"
    "fixed defect,0"
)


def write(tmp_path: Path, text: str, name: str = "site.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def problems_of(path: Path) -> str:
    with pytest.raises(DataValidationError) as info:
        load_site_table(path, CONTRACT)
    message = str(info.value)
    assert str(path) in message
    return message


def test_builtin_sites_validate_with_their_real_missing_values() -> None:
    data = load_site_table(CLEVELAND, CONTRACT)
    assert data.x.shape == (304, CONTRACT.num_inputs)
    assert set(np.unique(data.y)) == {0.0, 1.0}
    assert np.abs(data.x).max() <= 1.0


def test_missing_and_unexpected_columns_are_listed(tmp_path: Path) -> None:
    header = HEADER.replace("chol,", "").replace(",num", ",num,mrn")
    row = GOOD_ROW.replace("233,", "") + ",12345"
    message = problems_of(write(tmp_path, f"{header}\n{row}\n"))
    assert "1 missing column(s) ['chol']" in message
    assert "1 unexpected column(s) ['mrn']" in message


def test_out_of_range_value_names_row_column_and_range(tmp_path: Path) -> None:
    rows = [GOOD_ROW, GOOD_ROW.replace(",145,", ",400,")]
    message = problems_of(write(tmp_path, HEADER + "\n" + "\n".join(rows) + "\n"))
    assert ("site.csv, column 'trestbps': 1 row outside the plausible range [60, 250] mm Hg (data row 2; "
            "data row N is line N+1 of the file)") in message
    assert "400" not in message


def test_unknown_category_and_non_number(tmp_path: Path) -> None:
    rows = [GOOD_ROW.replace("Male", "M"), GOOD_ROW.replace(",63,", ",sixty,")]
    message = problems_of(write(tmp_path, HEADER + "\n" + "\n".join(rows) + "\n"))
    assert "column 'sex': 1 row with an unknown category; allowed: ['Male', 'Female'] (data row 1;" in message
    assert "column 'age': 1 row not a number (data row 2;" in message
    assert "'M'" not in message and "sixty" not in message


def test_label_with_other_values(tmp_path: Path) -> None:
    message = problems_of(write(tmp_path, f"{HEADER}\n{GOOD_ROW[:-1]}7\n"))
    assert ("column 'num': 1 row with a label that is not allowed; allowed: positive ['1', '2', '3', '4'], "
            "negative ['0'] (data row 1;") in message
    assert "7" not in message.split("column 'num'")[1].split("(data")[0]


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    assert "file is empty" in problems_of(write(tmp_path, "", "empty.csv"))
    assert "no data rows" in problems_of(write(tmp_path, HEADER + "\n", "header.csv"))


def test_wrong_delimiter_is_named(tmp_path: Path) -> None:
    text = HEADER.replace(",", ";") + "\n" + GOOD_ROW.replace(",", ";") + "\n"
    assert "wrong delimiter: the header is separated by ';'" in problems_of(write(tmp_path, text))


def test_wrong_encoding_names_the_line(tmp_path: Path) -> None:
    text = f"{HEADER}\n{GOOD_ROW}\n{GOOD_ROW.replace('Cleveland', 'Zürich')}\n"
    message = problems_of(write(tmp_path, text, encoding="latin-1"))
    assert "cannot be read as utf-8" in message and "line 3" in message


def test_ragged_rows_are_a_malformed_csv(tmp_path: Path) -> None:
    assert "malformed CSV" in problems_of(write(tmp_path, f"{HEADER}\n{GOOD_ROW},extra,fields\n"))


def test_missing_file_and_unsupported_type(tmp_path: Path) -> None:
    assert "file not found" in problems_of(tmp_path / "nope.csv")
    assert "unsupported file type '.xlsx'" in problems_of(write(tmp_path, "x", "site.xlsx"))


def test_missing_value_policies(tmp_path: Path) -> None:
    path = write(tmp_path, f"{HEADER}\n{GOOD_ROW}\n{GOOD_ROW.replace(',233,', ',0,')}\n")
    imputed = load_site_table(path, CONTRACT)
    names = CONTRACT.encoded_names()
    assert imputed.x[1, names.index("chol:missing")] == 1.0 and imputed.x[0, names.index("chol:missing")] == 0
    dropped = load_site_table(path, contract_from_dict({**_contract_table(), "missing": "drop"}))
    assert len(dropped) == 1 and dropped.rows_dropped == 1
    refusal = r"column 'chol': 1 row missing \(the column's missing policy is 'error'\) \(data row 2;"
    with pytest.raises(DataValidationError, match=refusal):
        load_site_table(path, contract_from_dict({**_contract_table(), "missing": "error"}))


def test_parquet_is_read_like_csv(tmp_path: Path) -> None:
    frame = pd.read_csv(CLEVELAND)
    frame.to_parquet(tmp_path / "site.parquet")
    from_parquet = load_site_table(tmp_path / "site.parquet", CONTRACT)
    from_csv = load_site_table(CLEVELAND, CONTRACT)
    np.testing.assert_allclose(from_parquet.x, from_csv.x)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in problems_of(tmp_path / "bad.parquet")


def test_preprocessing_is_identical_across_sites_without_pooling(tmp_path: Path) -> None:
    """The same patient row encodes the same at every site, whatever else each site holds."""
    others = pd.read_csv(CLEVELAND).iloc[10:60].to_csv(index=False).splitlines()[1:]
    site_a = write(tmp_path, "\n".join([HEADER, GOOD_ROW, *others[:5]]) + "\n", "a.csv")
    site_b = write(tmp_path, "\n".join([HEADER, *others[5:], GOOD_ROW]) + "\n", "b.csv")
    a, b = load_site_table(site_a, CONTRACT), load_site_table(site_b, CONTRACT)
    np.testing.assert_array_equal(a.x[0], b.x[-1])
    age = CONTRACT.encoded_names().index("age")
    assert a.x[0, age] == pytest.approx((63 - 59) / 41)  # declared range [18, 100]


def test_split_is_fixed_stratified_and_disjoint() -> None:
    data = load_site_table(CLEVELAND, CONTRACT)
    train, test = split_train_test(data, test_fraction=1 / 3, seed=42)
    again, _ = split_train_test(data, test_fraction=1 / 3, seed=42)
    np.testing.assert_array_equal(train.x, again.x)
    assert len(train) + len(test) == len(data) and len(test) == 102
    assert abs(train.y.mean() - test.y.mean()) < 0.02


def _contract_table() -> dict:
    return dict(load_study(HEART).raw["contract"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"features": []}, "declare at least one feature"),
        ({"target": {"name": "num", "positive": [1], "negative": [1]}}, "disjoint"),
        ({"missing": "guess"}, r"\[contract\]\.missing: got \"guess\" .*expected one of \"impute\""),
        ({"features": [{"name": "age", "type": "numeric", "min": 5, "max": 1}]}, "min must be below max"),
        ({"features": [{"name": "sex", "type": "categorical", "values": ["M"]}]},
         r"\[\[contract\.features\]\] 'sex'\.values: got an array of 1 item\(s\); expected an array of 2 to"),
    ],
)
def test_malformed_contracts_are_rejected(change: dict, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        contract_from_dict({**_contract_table(), **change})


def test_study_config_errors_name_the_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "[study]\nrounds = 3\n[strategy]\nname = 'fedmagic'\n", "study.toml")
    with pytest.raises(StudyConfigError, match=str(bad)):
        load_study(bad)
