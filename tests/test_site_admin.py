"""A hospital's site directory without any network: init, check, approvals, and the compose file."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from client.approval import ApprovalError, load_approval
from client.deploy.approvals import approve_app, revoke_app
from client.deploy.site_dir import SiteAdminError, check_site, init_site, load_connection, supernode_command
from client.site import load_site_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "pm_common" / "datasets" / "heart_disease"
STUDY = REPO / "docker" / "studies" / "heart_disease.toml"
HASH_A, HASH_B = "a" * 64, "b" * 64


@pytest.fixture
def site(tmp_path: Path) -> Path:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return init_site(
        tmp_path / "cleveland",
        "cleveland",
        DATA / "cleveland.csv",
        superlink="fl.example.org:8000",
        ca=ca,
        epsilon=2.0,
        max_rounds=7,
        studies=("heart-disease",),
    )


def test_init_writes_a_config_the_client_app_reads_and_keys_flower_accepts(site: Path) -> None:
    spec = load_site_config(site)
    assert (spec.name, spec.privacy.epsilon, spec.privacy.max_rounds) == ("cleveland", 2.0, 7)
    key = load_ssh_private_key((site / "keys" / "site.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    public = load_ssh_public_key((site / "keys" / "site.pub").read_bytes())
    assert public.public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE((site / "keys" / "site.key").stat().st_mode) == 0o600
    assert (site / "tls" / "ca.crt").exists()
    conn = load_connection(site)
    assert conn.superlink == "fl.example.org:8000" and conn.private_key == site / "keys" / "site.key"
    with pytest.raises(SiteAdminError, match="already a site"):
        init_site(site, "cleveland", DATA / "cleveland.csv")


def test_supernode_command_is_tls_with_the_sites_key(site: Path) -> None:
    cmd = supernode_command(site)
    assert cmd[cmd.index("--root-certificates") + 1] == str(site / "tls" / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(site / "keys" / "site.key")
    assert cmd[cmd.index("--isolation") + 1] == "process" and "--insecure" not in cmd
    assert "--insecure" in supernode_command(site, insecure=True)
    (site / "tls" / "ca.crt").unlink()
    with pytest.raises(SiteAdminError, match="CA"):
        supernode_command(site)


def test_approvals_default_to_nothing_and_edits_keep_comments(site: Path) -> None:
    approval = load_approval(site)
    assert approval.apps == () and "has not approved" in approval.app_refusal(HASH_A)
    assert approve_app(site, HASH_A) and not approve_app(site, HASH_A.upper())
    assert approve_app(site, HASH_B)
    assert load_approval(site).apps == (HASH_A, HASH_B)
    assert load_approval(site).app_refusal(HASH_A) == ""
    assert "# SHA-256 of each approved study app" in (site / "site.toml").read_text()
    assert revoke_app(site, HASH_A) and load_approval(site).apps == (HASH_B,)
    with pytest.raises(ApprovalError, match="SHA-256"):
        approve_app(site, "not-a-hash")
    assert load_approval(site).study_refusal("heart-disease") == ""
    assert "does not take part" in load_approval(site).study_refusal("another-study")


def test_check_reports_counts_and_the_dp_plan(site: Path) -> None:
    report = check_site(site, STUDY)
    assert report.ok, report.problems
    assert report.rows == report.train_rows + report.test_rows > 0 and report.inputs > 0
    assert report.noise_multiplier and report.noise_multiplier > 0 and report.planned_rounds == 5


def test_check_lists_data_problems_and_unapproved_studies(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    shutil.copyfile(DATA / "hungary.csv", bad)
    bad.write_text(bad.read_text().replace("Male", "Mle", 1))
    site = init_site(tmp_path / "s", "s", bad, studies=("other-study",))
    report = check_site(site, STUDY)
    assert not report.ok and not report.study_accepted
    assert any("does not take part" in p for p in report.problems)
    assert any("column 'sex': 1 row with an unknown category" in p for p in report.problems)
    assert not any("Mle" in p for p in report.problems)  # the cell's value stays out of the report


def test_compose_file_keeps_secrets_at_home_and_state_in_volumes() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("hospital-a", "hospital-b"):
        site = services[name]
        assert "ports" not in site  # sites only dial out
        mounts = {m.split(":")[1]: m for m in site["volumes"]}
        assert mounts["/site"].startswith("hospital-") and mounts["/ca"].endswith(":ro")
        assert not any(m.startswith("coordinator") for m in site["volumes"])  # no server keys
    assert services["coordinator"]["volumes"][0].startswith("coordinator:/coordinator")
    assert "--insecure" not in services["coordinator"]["command"]
    assert set(compose["volumes"]) >= {"coordinator", "ca", "hospital-a", "hospital-b"}
    for tool in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(tool[0]) and subprocess.run([*tool, "version"], capture_output=True).returncode == 0:
            out = subprocess.run(
                [*tool, "-p", "pmfl-pilot", "-f", str(REPO / "docker" / "compose.yaml"), "config", "-q"],
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, out.stderr


def _tiny_app(root: Path) -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text(
        '[project]\nname = "tiny"\nversion = "1.0.0"\n'
        '[tool.flwr.app]\npublisher = "test"\n'
        '[tool.flwr.app.components]\nserverapp = "app:server"\nclientapp = "app:client"\n'
        "[tool.flwr.app.config]\n"
    )
    (root / "app.py").write_text("server = client = None\n")
    (root / ".gitignore").write_text("runs/\n")
    return root


def test_a_site_inside_the_app_tree_would_ship_its_files_and_is_refused(tmp_path: Path) -> None:
    from client.deploy.approvals import app_hash

    app = _tiny_app(tmp_path / "app")
    site = init_site(app / "sites" / "a", "a", DATA / "cleveland.csv")
    with pytest.raises(ApprovalError, match="would contain this site's files"):
        app_hash(app, site)
    ignored = init_site(app / "runs" / "b", "b", DATA / "cleveland.csv")
    shutil.rmtree(site)
    assert len(app_hash(app, ignored)) == 64  # a git-ignored folder is not packed


def test_the_approved_hash_covers_the_apps_code_not_docs_or_tests(tmp_path: Path) -> None:
    """pyproject's fab-include: the bundle a site approves holds the app packages only."""
    from client.deploy.approvals import app_hash
    from pm_common.deploy.app_bundle import bundle_files

    app = tmp_path / "app"
    skip = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "runs", "artifacts")
    shutil.copytree(REPO, app, ignore=skip)
    approved = app_hash(app)
    packed = bundle_files(app)
    assert {"client/app.py", "server/app.py", "pm_common/privacy/accountant.py"} <= set(packed)
    left_out = {"docs", "tests", "benchmarks", "docker", "simulations", "README.md"}
    assert not [n for n in packed if n.split("/")[0] in left_out]
    (app / "README.md").write_text("edited\n")
    (app / "docs" / "deployment.md").write_text("edited\n")
    (app / "tests" / "test_new.py").write_text("def test_x() -> None: ...\n")
    tooling = ("client/deploy/cli.py", "server/deploy/coordinator.py", "server/deploy/pki.py",
               "server/deploy/superlink.py", "pm_common/audit/rules.py", "pm_common/deploy/app_bundle.py",
               "pm_common/datasets/vendor_task_data.py")
    assert not set(tooling) & set(packed)  # coordinator, PKI, launcher and audit tooling stay out
    for name in tooling:
        with (app / name).open("a") as fh:
            fh.write("# edited tooling\n")
    assert app_hash(app) == approved
    with (app / "client" / "app.py").open("a") as fh:
        fh.write("# one more line of code\n")
    assert app_hash(app) != approved


def test_every_module_the_bundle_holds_imports_only_the_bundle() -> None:
    """The ServerApp and ClientApp must run from the approved bundle alone: no module in it may import
    the tooling left out of it (a site would then run code it never approved, or fail)."""
    import ast

    from pm_common.deploy.app_bundle import bundle_files

    packed = {n for n in bundle_files(REPO) if n.endswith(".py")}
    ours = ("client", "server", "pm_common", "simulations", "pmfl", "benchmarks")
    outside = []
    for name in sorted(packed):
        for node in ast.walk(ast.parse((REPO / name).read_text(encoding="utf-8"))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for module in modules:
                if module.split(".")[0] not in ours:
                    continue
                path = module.replace(".", "/")
                if f"{path}.py" not in packed and f"{path}/__init__.py" not in packed:
                    outside.append(f"{name} imports {module}")
    assert not outside, outside
