"""Exports as hospitals write them (issue #15, item 4): number formats, code spellings, grouped reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w

from pm_common.data.contract import category_key, contract_from_dict
from pm_common.data.tabular import DataValidationError, NumberFormat, load_site_table, parse_numbers
from pm_common.study.config import StudyConfigError, load_study
from simulations.preflight import SiteDataError, preflight
from tests.conftest import heart_study

SMALL = {
    "target": {"name": "y", "positive": [1], "negative": [0]},
    "features": [
        {"name": "income", "type": "numeric", "min": 0, "max": 1_000_000},
        {"name": "grade", "type": "categorical", "values": [1, 2, 3]},
        {"name": "ratio", "type": "categorical", "values": ["0.5", "1.5"]},
    ],
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_thousands_and_decimal_separators_are_read_as_the_site_declares() -> None:
    cells = pd.Series(["265,000", "1,234,567.5", "12", "-3,000.25", "", "NA"])
    values, missing, bad = parse_numbers(cells, NumberFormat(thousands=",", decimal="."))
    np.testing.assert_array_equal(values[:4], [265000, 1234567.5, 12, -3000.25])
    assert missing.tolist() == [False] * 4 + [True, True] and not bad.any()
    european = pd.Series(["265.000", "1.234.567,5", "3,5", "0,25"])
    values, _, bad = parse_numbers(european, NumberFormat(thousands=".", decimal=","))
    np.testing.assert_array_equal(values, [265000, 1234567.5, 3.5, 0.25])
    assert not bad.any()


def test_malformed_groups_and_the_wrong_format_are_refused_not_misread() -> None:
    """`2,65` is not 265 and `3.5` under a decimal comma is not 35: both are refused."""
    _, _, bad = parse_numbers(pd.Series(["2,65", "1,2345", "12,345", "inf"]), NumberFormat(","))
    assert bad.tolist() == [True, True, False, True]
    _, _, bad = parse_numbers(pd.Series(["3.5", "3,5"]), NumberFormat("", ","))
    assert bad.tolist() == [True, False]
    _, _, bad = parse_numbers(pd.Series(["265,000"]), NumberFormat())  # no separator declared
    assert bad.tolist() == [True]


def test_numeric_category_codes_match_whatever_their_spelling(tmp_path: Path) -> None:
    assert category_key("1") == category_key("1.0") == category_key("1.00") == category_key(1) == "1"
    assert category_key("1,0", decimal=",") == "1" and category_key("0.50") == category_key("0.5")
    assert category_key("Male") == category_key("MALE") != category_key("1")
    contract = contract_from_dict(SMALL)
    text = "income,grade,ratio,y\n10,1.0,0.50,1\n20,2.00,1.5,0\n30,3,1.50,1.0\n"
    path = _write(tmp_path / "site.csv", text)
    data = load_site_table(path, contract)
    names = contract.encoded_names()
    grade = [names.index(f"grade={v}") for v in ("1", "2", "3")]
    np.testing.assert_array_equal(data.x[:, grade], np.eye(3))
    assert data.x[:, names.index("ratio=0.5")].tolist() == [1, 0, 0]
    with pytest.raises(Exception, match="spellings of the same category"):
        contract_from_dict({**SMALL, "features": [{"name": "g", "type": "categorical",
                                                   "values": ["1", "1.0"]}]})


def test_a_site_with_its_own_number_format_runs_the_same_contract(tmp_path: Path) -> None:
    """Site b exports `265.000,5` (site.toml-style settings in its [[sites]] entry); it encodes like a."""
    _write(tmp_path / "a.csv", "income,grade,ratio,y\n265000.5,1,0.5,1\n1000,2,1.5,0\n")
    _write(tmp_path / "b.csv", "income;grade;ratio;y\n265.000,5;1,0;0,5;1\n1.000;2;1,5;0\n")
    table = {"study": {"name": "s"}, "contract": SMALL, "sites": [
        {"name": "a", "data": "a.csv"},
        {"name": "b", "data": "b.csv", "delimiter": ";", "thousands": ".", "decimal": ","}]}
    study_path = tmp_path / "study.toml"
    study_path.write_text(tomli_w.dumps(table), encoding="utf-8")
    study = load_study(study_path)
    a, b = (load_site_table(s.data, study.contract, delimiter=s.delimiter,
                            number_format=NumberFormat(s.thousands, s.decimal)) for s in study.sites)
    np.testing.assert_array_equal(a.x, b.x)
    table["sites"][1]["thousands"] = ","
    study_path.write_text(tomli_w.dumps(table), encoding="utf-8")
    with pytest.raises(StudyConfigError, match=r"\[\[sites\]\] 'b'.thousands: ',' is also the decimal mark"):
        load_study(study_path)


def test_problems_are_grouped_per_column_with_counts_and_no_values(tmp_path: Path) -> None:
    """Exact one-line format; the planted values (7777777, 'Z9', 'bad-number') appear nowhere."""
    rows = ["income,grade,ratio,y"] + [f"{1000 * i},1,0.5,1" for i in range(1, 12)]
    for r in (2, 4, 5, 6, 7, 8, 9):  # seven out-of-range incomes
        rows[r] = rows[r].replace(f"{1000 * (r)},", "7777777,", 1)
    rows[3] = rows[3].replace(",1,0.5,", ",Z9,0.5,")
    rows[10] = rows[10].replace("10000,", "bad-number,")
    path = _write(tmp_path / "site.csv", "\n".join(rows) + "\n")
    with pytest.raises(DataValidationError) as info:
        load_site_table(path, contract_from_dict(SMALL))
    lines = str(info.value).splitlines()
    assert lines[0] == f"3 problem(s) in {path}:"
    assert lines[1:] == [
        f"  {path}, column 'income': 1 row not a number (data row 10; data row N is line N+1 of the file)",
        f"  {path}, column 'income': 7 rows outside the plausible range [0, 1e+06] (data rows 2, 4, 5, 6, 7 "
        "and 2 more; data row N is line N+1 of the file)",
        f"  {path}, column 'grade': 1 row with an unknown category; allowed: ['1', '2', '3'] (data row 3; "
        "data row N is line N+1 of the file)",
    ]
    for value in ("7777777", "Z9", "bad-number"):
        assert value not in str(info.value)


def test_a_thousands_separator_the_site_did_not_declare_gets_a_hint(tmp_path: Path) -> None:
    path = _write(tmp_path / "site.csv", "income,grade,ratio,y\n\"265,000\",1,0.5,1\n")
    with pytest.raises(DataValidationError, match="set the site's 'thousands' and 'decimal'"):
        load_site_table(path, contract_from_dict(SMALL))


def test_validation_checks_every_file_and_every_column_before_stopping(
    tmp_path: Path, heart_sites: list[dict]
) -> None:
    """A missing column does not hide the cell problems of the other columns, nor another site's."""
    bad_a = pd.read_csv(heart_sites[0]["data"], dtype=str, keep_default_na=False).drop(columns=["chol"])
    bad_a.loc[3, "age"] = "999"
    bad_a.to_csv(tmp_path / "a.csv", index=False)
    bad_b = pd.read_csv(heart_sites[1]["data"], dtype=str, keep_default_na=False)
    bad_b.loc[0, "sex"] = "X"
    bad_b.to_csv(tmp_path / "b.csv", index=False)
    sites = [{**heart_sites[0], "data": str(tmp_path / "a.csv")},
             {**heart_sites[1], "data": str(tmp_path / "b.csv")}]
    _, study = heart_study(tmp_path, sites)
    with pytest.raises(SiteDataError) as info:
        preflight(study, plans=False)
    text = "\n".join(info.value.problems)
    assert "[[sites]] 'cleveland'.data: " in text and "1 missing column(s) ['chol']" in text
    assert "a.csv, column 'age': 1 row outside the plausible range [18, 100] years (data row 4;" in text
    assert "b.csv, column 'sex': 1 row with an unknown category; allowed: ['Male', 'Female'] (data row 1;" \
        in text
    assert "999" not in text


def test_a_deployed_sites_number_format_is_its_own_setting(tmp_path: Path) -> None:
    """site.toml's [site] takes thousands/decimal beside delimiter/encoding (the site's settings)."""
    from client.site import load_site_config

    site_toml = tmp_path / "site.toml"
    head = '[site]\nname = "b"\ndata = "b.csv"\n'
    site_toml.write_text(head + 'delimiter = ";"\nthousands = "."\ndecimal = ","\n', encoding="utf-8")
    spec = load_site_config(tmp_path)
    assert (spec.delimiter, spec.thousands, spec.decimal) == (";", ".", ",")
    site_toml.write_text(head + 'decimal = ","\nthousands = ","\n', encoding="utf-8")
    with pytest.raises(StudyConfigError, match=r"\[site\].thousands: ',' is also the decimal mark"):
        load_site_config(tmp_path)
    site_toml.write_text(head + 'decimal = ";"\n', encoding="utf-8")
    refusal = r'\[site\].decimal: got ";" \(text\); expected one of ".", ","'
    with pytest.raises(StudyConfigError, match=refusal):
        load_site_config(tmp_path)
