"""A careless or hostile study file, site.toml or command line: refused whole, one line per problem.

Every setting is checked for type, range and allowed values before anything starts; unknown keys
are refused in every table; absurd magnitudes are refused or bounded so nothing hangs.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from client.app import app as client_app
from client.approval import ApprovalError, load_approval
from client.deploy.site_dir import SiteAdminError, load_connection
from client.site import load_site_config
from pm_common.privacy.accountant import plan_study
from pm_common.study.config import StudyConfigError, load_study, study_from_dict
from pm_common.wire import keys as p
from pmfl.cli import app
from simulations.scenarios import scenario_path
from tests.conftest import HEART, enroll, site_context, train_message

REPO = Path(__file__).resolve().parents[2]
PLACE = re.compile(r"\[\[?[^\[\]\s][^\[\]]*\]\]?")  # [training], [[sites]], [contract.target], ["odd"]
runner = CliRunner()


def heart_raw() -> dict[str, Any]:
    """The built-in heart-disease study as loaded (data paths absolute)."""
    return copy.deepcopy(dict(load_study(HEART).raw))


def write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


def simulate(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["simulate", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def refusal_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# -- issue #14 item 14: the example values, each a named regression case --------------------------

ITEM_14 = {
    "epsilon-text": (("privacy", None, "epsilon", "abc"), "[privacy].epsilon"),
    "rounds-text": (("study", None, "rounds", "two"), "[study].rounds"),
    "data-number": (("sites", 0, "data", 42), "[[sites]] 'cleveland'.data"),
    "model-unknown": (("model", None, "name", "resnet"), "[model].name"),
    "batch-size-zero": (("training", None, "batch_size", 0), "[training].batch_size"),
    "local-epochs-negative": (("training", None, "local_epochs", -1), "[training].local_epochs"),
    "learning-rate-text": (("training", None, "learning_rate", "fast"), "[training].learning_rate"),
    "test-fraction-one": (("split", None, "test_fraction", 1.0), "[split].test_fraction"),
}


@pytest.mark.parametrize("case", sorted(ITEM_14))
def test_each_bad_value_of_issue_14_is_refused_before_anything_starts(case: str, tmp_path: Path) -> None:
    """Claim: a wrong type or value in a study file is refused before anything starts, in one line that
    names the `[table].key`, what was found and what is allowed; exit code 2, never a traceback.
    Attack: the study file of issue #14 item 14 (`epsilon = "abc"`, `rounds = "two"`, `data = 42`,
    `model = "resnet"`, `batch_size = 0`, `local_epochs = -1`, `learning_rate = "fast"`,
    `test_fraction = 1.0`), run for real (`pmfl simulate --config`, no dry run)."""
    (table, index, key, value), place = ITEM_14[case]
    raw = heart_raw()
    (raw[table][index] if index is not None else raw[table])[key] = value
    out = tmp_path / "run"
    code, output = simulate("--config", str(write(tmp_path / "study.toml", raw)), "--out", str(out))
    assert code == 2, output
    lines = refusal_lines(output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{place}: got " in lines[0], output
    assert "expected" in lines[0] and "Traceback" not in output
    assert not (out / "metrics.json").exists() and not (out / "privacy").exists()  # nothing started


def test_every_problem_of_a_file_is_listed_at_once(tmp_path: Path) -> None:
    """Claim: a study file's problems are all reported together (one line each), not one per attempt.
    Attack: every item-14 value in one file, plus an unknown table."""
    raw = heart_raw()
    for (table, index, key, value), _ in ITEM_14.values():
        (raw[table][index] if index is not None else raw[table])[key] = value
    raw["tabel"] = {"rounds": 3}
    code, output = simulate("--config", str(write(tmp_path / "study.toml", raw)), "--dry-run")
    assert code == 2
    lines = refusal_lines(output)
    assert len(lines) == len(ITEM_14) + 1
    for _, place in ITEM_14.values():
        assert sum(f"{place}: got " in line for line in lines) == 1, place
    assert any("[tabel]: unknown table; allowed: [study]" in line for line in lines)


@pytest.mark.parametrize(
    ("option", "value", "place"),
    [("--rounds", "0", "[study].rounds"), ("--epsilon", "nan", "[privacy].epsilon"),
     ("--delta", "0.5", "[privacy].delta"), ("--strategy", "fedmagic", "[strategy].name"),
     ("--model", "small-cnn", "[model].name"), ("--seed", "-1", "[study].seed")],
)
def test_command_line_overrides_are_checked_like_the_file(option: str, value: str, place: str) -> None:
    """Claim: a command-line override is checked exactly as the study file's own value.
    Attack: `pmfl simulate heart-disease --rounds 0` (and nan, too large, unknown or wrong-task values)."""
    code, output = simulate("heart-disease", option, value, "--dry-run")
    assert code == 2 and f"{place}: got " in output, output


# -- issue #14 item 15: unknown keys, in every table ----------------------------------------------

TABLES = {
    "[study]": lambda raw: raw["study"],
    "[model]": lambda raw: raw["model"],
    "[training]": lambda raw: raw["training"],
    "[strategy]": lambda raw: raw["strategy"],
    "[privacy]": lambda raw: raw["privacy"],
    "[split]": lambda raw: raw["split"],
    "[contract]": lambda raw: raw["contract"],
    "[contract.target]": lambda raw: raw["contract"]["target"],
    "[[contract.features]] 'age'": lambda raw: raw["contract"]["features"][0],
    "[[contract.features]] 'sex'": lambda raw: raw["contract"]["features"][1],
    "[[sites]] 'hungary'": lambda raw: raw["sites"][1],
    "[hospital_dp]": lambda raw: raw.setdefault("hospital_dp", {}),
    "[secure_aggregation]": lambda raw: raw.setdefault("secure_aggregation", {}),
    "[simulation]": lambda raw: raw.setdefault("simulation", {}),
}


@pytest.mark.parametrize("place", list(TABLES))
def test_an_unknown_key_is_refused_in_every_study_table(place: str, tmp_path: Path) -> None:
    """Claim: no table of a study file ignores a key it does not know: a typo is refused, naming the
    key and the keys that table allows.
    Attack: `colour = "red"` added to each table in turn (the contract's target and features ignored
    such keys before)."""
    raw = heart_raw()
    TABLES[place](raw)["colour"] = "red"
    with pytest.raises(StudyConfigError) as caught:
        load_study(write(tmp_path / "study.toml", raw))
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{place}.colour: unknown key; allowed: ")


def test_unknown_tables_and_image_keys_are_refused(tmp_path: Path) -> None:
    """Claim: an unknown top-level table, a table of the other task and an unknown `[images]` key are
    refused, not skipped.
    Attack: `[tabel]` in a tabular study, `[images]` in a tabular study, `[images] colour` in an
    imaging study."""
    raw = heart_raw()
    raw["tabel"] = {"rounds": 3}
    raw["images"] = {"size": 64, "classes": ["a", "b"]}
    with pytest.raises(StudyConfigError) as caught:
        study_from_dict(raw, tmp_path)
    assert caught.value.problems[0].startswith("[tabel]: unknown table; allowed: [study], [model]")
    assert caught.value.problems[1].startswith("[images]: applies to image studies only")
    imaging = tomllib.loads(scenario_path("imaging-synthetic").read_text(encoding="utf-8"))
    imaging.pop("synthetic")  # generated by the scenario runner before the study is checked
    imaging["images"]["colour"] = "red"
    with pytest.raises(StudyConfigError, match=r"^\[images\]\.colour: unknown key; allowed: channels, cl"):
        study_from_dict(imaging, tmp_path)


SITE_TOML = """\
[site]
name = "hungary"
data = "{data}"

[privacy]
dp = true
epsilon = 3.0
delta = 1e-5
max_rounds = 5

[approval]
studies = ["heart-disease"]
apps = []

[connection]
superlink = "127.0.0.1:8000"
runtime_port = 9094
poll_interval = 0.5
"""


@pytest.mark.parametrize(
    ("edit", "loader", "message"),
    [
        (("[privacy]\n", "[privacy]\ncolour = 1\n"), load_site_config, r"\[privacy\]\.colour: unknown key"),
        (("epsilon = 3.0", 'epsilon = "abc"'), load_site_config, r"\[privacy\]\.epsilon: got \"abc\""),
        (("max_rounds = 5", "max_rounds = true"), load_site_config, r"\[privacy\]\.max_rounds: got true"),
        (('name = "hungary"', 'name = "../other"'), load_site_config, r"\[site\]\.name: got \"\.\./other\""),
        (("[site]\n", "[site]\ndelimiter = 7\n"), load_site_config, r"\[site\]\.delimiter: got 7"),
        (("[site]\n", "[sites]\nx = 1\n[site]\n"), load_site_config, r"\[sites\]: unknown table"),
        (("apps = []", "apps = []\ncolour = 1"), load_approval, r"\[approval\]\.colour: unknown key"),
        (('studies = ["heart-disease"]', "studies = 5"), load_approval, r"\[approval\]\.studies: got 5"),
        (("runtime_port = 9094", 'runtime_port = "x"'), load_connection, r"\[connection\]\.runtime_port: "),
        (("poll_interval = 0.5", "poll_interval = 0"), load_connection, r"\[connection\]\.poll_interval: "),
        (("poll_interval = 0.5", "poll_interval = 0.5\nport = 1"), load_connection, r"\[connection\]\.port"),
    ],
)
def test_a_hospitals_site_toml_is_checked_key_by_key(
    edit: tuple[str, str], loader: Any, message: str, tmp_path: Path
) -> None:
    """Claim: a hospital's own settings (site.toml: [site], [privacy], [approval], [connection]) are
    checked like a study file: type, range, allowed values, unknown keys and tables, one line each.
    Attack: a text budget, a boolean round limit, a path in the site's name, an unknown table or key,
    a text port, a zero poll interval (a busy loop against the coordinator)."""
    heart = load_study(HEART)
    text = SITE_TOML.format(data=heart.sites[1].data).replace(*edit)
    (tmp_path / "site.toml").write_text(text, encoding="utf-8")
    with pytest.raises((StudyConfigError, ApprovalError, SiteAdminError), match=message):
        loader(tmp_path)


# -- absurd magnitudes: refused, or bounded in time ----------------------------------------------

ABSURD = [
    ("study", "rounds", 10**12), ("study", "seed", 2**64), ("study", "min_report_count", 10**15),
    ("model", "hidden", [10**9]), ("model", "hidden", [8] * 100), ("training", "local_epochs", 10**9),
    ("training", "batch_size", 2**62), ("training", "learning_rate", 1e300),
    ("training", "max_grad_norm", math.inf), ("privacy", "epsilon", 1e308), ("privacy", "delta", 0.9),
    ("privacy", "max_rounds", 10**10), ("split", "seed", 2**40), ("strategy", "min_sites", 10**6),
    ("hospital_dp", "noise_multiplier", 1e300), ("secure_aggregation", "neighbours", 10**9),
]


@pytest.mark.parametrize(("table", "key", "value"), ABSURD)
def test_absurd_magnitudes_are_refused_with_their_bound(
    table: str, key: str, value: Any, tmp_path: Path
) -> None:
    """Claim: a value that would make a run unbounded (rounds, epochs, widths, batch sizes) or
    meaningless (epsilon 1e308, delta 0.9) is refused, naming the bound.
    Attack: huge magnitudes for every numeric setting."""
    raw = heart_raw()
    raw.setdefault(table, {})[key] = value
    with pytest.raises(StudyConfigError) as caught:
        study_from_dict(raw, tmp_path)
    assert [p.split(": got ")[0] for p in caught.value.problems] == [f"[{table}].{key}"]


def _finishes(code: str, seconds: float) -> tuple[bool, float]:
    """Run `code` in a fresh interpreter with a 4 GB memory cap; did it finish in time?"""
    started = time.monotonic()
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
    try:
        proc = subprocess.run([sys.executable, "-c", limit + code], cwd=REPO, timeout=seconds,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    return True, time.monotonic() - started


def test_noise_calibration_terminates_at_extreme_settings() -> None:
    """Claim: planning a site's noise never hangs: at every accepted setting it returns a sigma that
    keeps the budget, or refuses; the PRV accountant (whose memory grows with the steps) is bounded.
    Attack: epsilon 100 with delta 0.1 over 10^13 steps at q = 1e-7 (Opacus' own search loops for
    ever there: epsilon jumps by more than its tolerance between neighbouring floats), and PRV over
    2 * 10^8 steps (it ran out of memory here)."""
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from pm_common.privacy.accountant import calibrate_noise_multiplier, cumulative_epsilon\n"
        "from pm_common.privacy.accountant import plan_study\n"
        "sigma = calibrate_noise_multiplier(100.0, 0.1, 1e-7, 10**13)\n"
        "assert cumulative_epsilon([(sigma, 1e-7, 10**13)], 0.1) <= 100.0\n"
        "try:\n"
        "    plan_study(epsilon_budget=3, delta=1e-5, num_examples=202, batch_size=1, local_epochs=100,\n"
        "               planned_rounds=10000, max_grad_norm=1.0, accountant='prv')\n"
        "except ValueError as exc:\n"
        "    assert 'prv accountant is limited' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('a PRV plan of 2e8 steps was accepted')\n"
    )
    finished, took = _finishes(code, 60)
    assert finished, f"noise calibration did not finish within 60 s ({took:.0f} s)"


def test_a_budget_too_small_to_plan_is_a_decline_shown_before_the_run(tmp_path: Path) -> None:
    """Claim: a budget no noise multiplier can meet is the site's own setting: the dry run names the
    site and the reason it will decline every round, instead of failing at every site in every round
    (the run itself: tests/attacks/test_budget_too_low.py).
    Attack: epsilon 1e-9 for one site."""
    raw = heart_raw()
    raw["sites"][2]["epsilon"] = 1e-9
    code, output = simulate("--config", str(write(tmp_path / "study.toml", raw)), "--dry-run")
    assert code == 0
    (line,) = [line for line in output.splitlines() if line.strip().startswith("switzerland:")]
    assert "DECLINES every round: privacy budget too low" in line


def test_prv_plans_stay_within_the_step_bound() -> None:
    """Claim: a PRV plan is refused above MAX_PRV_STEPS and accepted below it.
    Fault: the bound itself (the calibration must stay fast at the bound)."""
    from pm_common.privacy.accountant import MAX_PRV_STEPS

    started = time.monotonic()
    plan = plan_study(epsilon_budget=3, delta=1e-5, num_examples=202, batch_size=16, local_epochs=1,
                      planned_rounds=MAX_PRV_STEPS // 13, max_grad_norm=1.0, accountant="prv")
    assert plan.steps_per_round * plan.planned_rounds <= MAX_PRV_STEPS and time.monotonic() - started < 30
    with pytest.raises(ValueError, match="prv accountant is limited"):
        plan_study(epsilon_budget=3, delta=1e-5, num_examples=202, batch_size=16, local_epochs=1,
                   planned_rounds=MAX_PRV_STEPS // 13 + 1, max_grad_norm=1.0, accountant="prv")


# -- the dry run plans what the sites will plan -----------------------------------------------------


def test_dry_run_prints_each_sites_plan_exactly_as_the_client_app_makes_it(tmp_path: Path) -> None:
    """Claim: `pmfl simulate --dry-run` starts nothing and shows, per site, the DP-SGD plan the site's
    ClientApp will make (same rows, sampling rate, steps and noise multiplier).
    Fault: a dry run that plans differently from the sites would promise a budget nobody spends."""
    from simulations.preflight import preflight

    raw = heart_raw()
    raw["study"]["rounds"] = 7
    raw["sites"][1].update(epsilon=1.5, max_rounds=4)
    path = write(tmp_path / "study.toml", raw)
    code, output = simulate("--config", str(path), "--dry-run", "--out", str(tmp_path / "run"))
    assert code == 0 and not (tmp_path / "run").exists()
    study = load_study(path)
    checked = {c.site.name: c for c in preflight(study)}
    for partition, site in enumerate(study.sites):
        context = site_context(path, partition=partition)
        reply = client_app(train_message(study, 1, run=enroll(study, [context]).run), context)
        assert not reply.has_error(), reply.error.reason
        ledger = json.loads(str(reply.content[p.SITE][p.LEDGER_LINE]))  # what the site planned and ran
        plan = checked[site.name].plan
        assert plan is not None
        assert ledger["noise_multiplier"] == plan.noise_multiplier
        assert ledger["sample_rate"] == plan.sample_rate
        assert plan.planned_rounds == (4 if site.name == "hungary" else 7)
        line = next(line for line in output.splitlines() if line.strip().startswith(f"{site.name}:"))
        assert f"noise multiplier {plan.noise_multiplier:.4g}" in line
        assert f"{plan.steps_per_round} steps per round x {plan.planned_rounds} rounds" in line


# -- property: any study file is refused clearly or runs, within bounded time ----------------------

MAX_SECONDS = 20.0  # per example; measured here: refusals 0.01-0.9 s, full dry runs 1-5 s
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
SCALARS = st.one_of(
    TEXT,
    st.integers(),  # any size: TOML says 64 bits, tomllib reads more
    st.integers(min_value=-3, max_value=300),
    st.floats(),  # nan, inf, huge
    st.floats(min_value=-1e-300, max_value=1e-300),  # tiny
    st.booleans(),
    st.dates(),
    st.datetimes(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
PLAUSIBLE: dict[str, list[Any]] = {  # valid or boundary values, so that some examples run in full
    "rounds": [1, 3, 10_000], "min_report_count": [1, 1_000_000], "hidden": [[1], [1024] * 8],
    "local_epochs": [1, 100], "batch_size": [1, 100_000], "learning_rate": [1e-9, 100],
    "momentum": [0, 0.99], "max_grad_norm": [1e-9, 1e4], "epsilon": [1e-9, 0.05, 100],
    "delta": [1e-300, 0.1], "accountant": ["rdp", "prv"], "dp": [True, False], "max_rounds": [1, 10_000],
    "test_fraction": [0.001, 0.5, 0.999], "grad_sample_mode": ["auto", "ew", "ghost"],
    "missing": ["impute", "drop", "error"], "type": ["numeric", "categorical"], "min": [-1e15, 0, 99],
    "max": [1, 1e15], "delimiter": [";", "\t", "|"], "encoding": ["utf-16", "latin-1", "idna", "u8"],
    "seed": [0, 2**32 - 1, 2**63 - 1], "positive": [[0], "1", 4.0], "missing_values": [[0], [], [1e15]],
}


@st.composite
def hostile_studies(draw: st.DrawFn) -> dict[str, Any]:
    """The heart-disease study with random keys of random tables (every table can be drawn: the
    [[sites]] entries, the contract's target and features included) replaced by random TOML values of
    random types, or by plausible and boundary values; sometimes unknown keys and tables."""
    raw = heart_raw()
    names = ("study", "model", "training", "strategy", "privacy", "split", "contract")
    tables = [raw[name] for name in names]
    tables += [raw["contract"]["target"], *raw["contract"]["features"], *raw["sites"]]
    for index in draw(st.lists(st.integers(0, len(tables) - 1), max_size=4, unique=True)):
        table = tables[index]
        for key in draw(st.sets(st.sampled_from(sorted(table)), min_size=1, max_size=2)):
            plausible = key in PLAUSIBLE and draw(st.booleans())
            table[key] = draw(st.sampled_from(PLAUSIBLE[key]) if plausible else VALUES)
        if draw(st.integers(0, 9)) == 0:
            table[draw(TEXT.filter(bool))] = draw(VALUES)
    if draw(st.integers(0, 19)) == 0:
        raw[draw(TEXT.filter(bool))] = draw(VALUES)
    return raw


@pytest.fixture(scope="module")
def warm_cli(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Import everything the dry run needs once, so the examples time themselves, not imports."""
    code, output = simulate("heart-disease", "--dry-run", "--out", str(tmp_path_factory.mktemp("warm")))
    assert code == 0, output


@settings(max_examples=200, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(raw=hostile_studies())
def test_any_study_file_is_refused_clearly_or_runs_within_bounded_time(
    raw: dict[str, Any], tmp_path: Path, warm_cli: None
) -> None:
    """Claim: whatever a study file holds, `pmfl simulate --dry-run` either plans every site (exit 0)
    or refuses with one line per problem, each naming its `[table].key` (exit 2): never exit 1,
    never a traceback, and within MAX_SECONDS.
    Attack: random types and values (text, huge and negative integers, nan/inf/huge/tiny floats,
    booleans, arrays, tables, dates) for random keys of every table, sometimes unknown keys;
    derandomized, so CI replays the same examples."""
    try:
        text = tomli_w.dumps(raw)
        tomllib.loads(text)
    except (TypeError, ValueError):  # not representable as TOML: not a study file anyone can write
        assume(False)
    path = tmp_path / "study.toml"
    path.write_text(text, encoding="utf-8")
    started = time.monotonic()
    code, output = simulate("--config", str(path), "--dry-run", "--out", str(tmp_path / "run"))
    took = time.monotonic() - started
    event(f"exit {code}")
    event(f"took {'< 1' if took < 1 else '1-5' if took < 5 else '>= 5'} s")
    assert took < MAX_SECONDS, f"{took:.1f} s"
    assert "Traceback" not in output
    assert code in (0, 2), output
    if code == 0:
        study = load_study(path)
        for site in study.sites:
            planned = rf"^  {re.escape(site.name)}: \d+ train / \d+ test rows; .*(noise multiplier|dp = f)"
            assert re.search(planned, output, re.MULTILINE), output
    else:
        lines = refusal_lines(output)
        assert lines, "refused without saying why"
        for line in lines:
            assert line.startswith("error: ") and PLACE.search(line), line
