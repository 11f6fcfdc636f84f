"""The coordinator's run directory: metrics, checkpoints, the final model and the sites' ledgers.

Ledger lines are stored byte for byte as the sites sent them. Files are rewritten after every
round, so a run that dies leaves everything up to its last completed round.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pm_common.privacy.hospital_dp import hospital_epsilon
from pm_common.records.ledger import (
    DECLINED,
    TRAINED,
    LedgerEntry,
    append_line,
    ledger_path,
    read_ledger,
    summarize,
)
from pm_common.records.roster import SignedRoster
from pm_common.records.signing import chain_head, public_key_pem, read_raw_ledger, verify_chain
from pm_common.redaction import failure_reason
from pm_common.study.config import StudyConfig, write_study
from pm_common.tasks import task_of
from pm_common.tasks.metrics import mean_over_sites
from server.model_card import model_card


@dataclass
class SiteRound:
    """What one site reported in one round."""

    site: str
    status: str
    reason: str = ""
    epsilon: float | None = None
    rejected: str = ""
    files_skipped: int = 0  # unusable image files the site left out of its data (its setting)
    warning: str = ""  # what the site wants the study to know (e.g. too few rows to learn)


@dataclass
class RoundProgress:
    """What the live display shows after each round."""

    round: int
    num_rounds: int
    trained: list[str]
    declined: dict[str, str]
    rejected: dict[str, str]
    failed: int
    mean_site_accuracy: float | None  # of the model the sites received at the start of the round
    pooled_accuracy: float | None
    max_epsilon: float | None
    metric: str = "accuracy"  # the task's headline metric
    mean_site: float | None = None  # of `metric`, mean over sites
    weighted_site_mean: float | None = None  # of `metric`, weighted by each site's test rows (not pooled)


ProgressCallback = Callable[[RoundProgress], None]

UPDATES_DIR = "empirical"  # under privacy/: global-NNNN.npz (model sent), update-NNNN.npz (reply)


def _flagged(metrics: dict[str, Any]) -> dict[str, Any]:
    """A site's evaluation as metrics.json shows it: the baseline flag as true/false."""
    if "no_better_than_baseline" not in metrics:
        return metrics
    return {**metrics, "no_better_than_baseline": bool(metrics["no_better_than_baseline"])}


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, allow_nan=False))


def _write_text(path: Path, text: str) -> None:
    """Replace `path` atomically (and durably): a crash leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class RunRecorder:
    run_dir: Path
    study: StudyConfig
    model_meta: dict[str, Any]
    on_round: ProgressCallback | None = None
    evaluations: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    participation: dict[int, list[SiteRound]] = field(default_factory=dict)
    failures: dict[int, list[str]] = field(default_factory=dict)
    left_out: dict[int, list[str]] = field(default_factory=dict)  # valid updates a robust rule skipped
    record_updates_of: str = ""  # empirical audit only: the one site whose per-round updates are kept
    roster: SignedRoster | None = None
    noise_seeded: bool = False  # a site seeded its noise for a test's replay (client/replay.py)
    personal: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> its personal model's report

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.privacy_dir.mkdir(parents=True, exist_ok=True)
        write_study(self.study, self.run_dir / "config.toml")

    @property
    def privacy_dir(self) -> Path:
        return self.run_dir / "privacy"

    # -- what the strategy feeds in -------------------------------------------------------
    def record_evaluation(self, model_round: int, site: str, metrics: dict[str, float]) -> None:
        self.evaluations.setdefault(model_round, {})[site] = dict(metrics)

    def record_personal(self, site: str, global_metrics: dict[str, float] | None,
                        personal_metrics: dict[str, float] | None, model_path: str, reason: str) -> None:
        """A site's personal model, as it reported it at the final evaluation: the final global
        model's and its personal model's metrics on its test rows, where the model lies at the site
        (never sent), or why it has none."""
        report: dict[str, Any] = {"global": global_metrics, "personal": personal_metrics}
        if model_path:
            report["model"] = model_path
        if reason:
            report["reason"] = reason
        self.personal[site] = report

    def record_site_round(self, server_round: int, report: SiteRound, ledger_line: str) -> None:
        if ledger_line:
            append_line(ledger_path(self.privacy_dir, report.site), ledger_line)
        self.participation.setdefault(server_round, []).append(report)

    def record_roster(self, signed: SignedRoster) -> None:
        """Keep the run's signed roster (`privacy/roster.json`) and each site's ledger key from it
        (`privacy/keys/<site>.pub`, for tools that read PEM): the record auditors verify against."""
        self.roster = signed
        _write_text(self.privacy_dir / "roster.json", signed.to_json() + "\n")
        for entry in signed.roster.sites:
            pem = public_key_pem(entry.public_key()).decode()
            _write_text(self.privacy_dir / "keys" / f"{entry.site}.pub", pem)

    def begin_attempt(self) -> int:
        """Count this start of the coordinator on the run: 0 for the first, one more per restart.

        Sites record the attempt on every line, so a round re-run after a crash is told apart from a
        replayed one (`attempts.json` in the run directory lists each start)."""
        path = self.run_dir / "attempts.json"
        starts = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
        starts.append({"attempt": len(starts), "started": datetime.now(UTC).isoformat(timespec="seconds")})
        _write_json(path, starts)
        return len(starts) - 1

    def reconcile_ledger(self, site: str, lines: list[str]) -> None:
        """Make the run's copy of `site`'s ledger the site's own, when that verifies and holds every
        line the copy holds; otherwise keep the copy and record why (the audit will show it).

        Why: the coordinator appends each line as a reply arrives, so a coordinator that died
        between a site's training and the reply lost that line from its copy, though the spend
        happened. The site's own ledger is complete."""
        entry = self.roster.roster.entry(site) if self.roster else None
        if entry is None or not lines:
            return
        try:
            rows = [json.loads(line) for line in lines]
        except ValueError:
            self.record_failure(0, f"{site} sent a ledger that is not JSON lines; the run's copy is kept")
            return
        check = verify_chain(rows, entry.public_key(), site)
        path = ledger_path(self.privacy_dir, site)
        held = read_raw_ledger(path) if path.exists() else []
        hashes = {row.get("entry_hash") for row in rows}
        if not check.ok:
            problem = check.problems[0].message
            self.record_failure(0, f"{site} sent a ledger that does not verify ({problem}); copy kept")
        elif any(row.get("entry_hash") not in hashes for row in held):
            self.record_failure(0, f"the run's copy of {site}'s ledger holds lines the site's own ledger "
                                "does not; the copy is kept")
        elif len(rows) > len(held):
            _write_text(path, "".join(line.rstrip("\n") + "\n" for line in lines))

    def record_sent(self, server_round: int, arrays: Any) -> None:
        """Empirical audit only: keep the global model (an ArrayRecord) sent for this round."""
        if self.record_updates_of:
            self._save_arrays(f"global-{server_round:04d}.npz", arrays)

    def record_update(self, server_round: int, site: str, arrays: Any) -> None:
        """Empirical audit only: keep the audited site's accepted update: what the coordinator sees."""
        if self.record_updates_of and site == self.record_updates_of:
            self._save_arrays(f"update-{server_round:04d}.npz", arrays)

    def _save_arrays(self, name: str, arrays: Any) -> None:
        path = self.privacy_dir / UPDATES_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{key: np.asarray(array.numpy()) for key, array in arrays.items()})

    def record_rejection(self, server_round: int, site: str, reason: str) -> None:
        """The site's update this round was not used: it was malformed or out of bounds (its spend
        still counts: the site trained)."""
        for report in self.participation.get(server_round, []):
            if report.site == site:
                report.rejected = reason
                return
        self.participation.setdefault(server_round, []).append(SiteRound(site, "trained", rejected=reason))

    def record_failure(self, server_round: int, description: str) -> None:
        """Keep one line per failure, whatever a site's error reply says: no traceback, path or value
        (pm_common.redaction.failure_reason)."""
        self.failures.setdefault(server_round, []).append(failure_reason(description))

    def record_left_out(self, server_round: int, sites: list[str]) -> None:
        """Sites whose valid updates the robust aggregator did not use (their spend still counts)."""
        self.left_out[server_round] = list(sites)

    # -- what the coordinator calls -------------------------------------------------------
    def checkpoint(
        self,
        server_round: int,
        state_dict: dict[str, torch.Tensor],
        strategy_state: dict[str, Any] | None = None,
    ) -> None:
        """Metrics first, then the checkpoint, atomically: a checkpoint on disk means its round is
        fully recorded, so a restarted coordinator can resume from it (server/resume.py)."""
        self.write_metrics()
        path = self.run_dir / "checkpoints" / f"round-{server_round:04d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({**self.model_meta, "round": server_round, "state_dict": state_dict,
                    "strategy_state": strategy_state or {}}, tmp)
        os.replace(tmp, path)

    def restore(self, up_to_round: int) -> None:
        """Reload metrics.json's rounds 0..up_to_round: a resumed coordinator continues its record."""
        path = self.run_dir / "metrics.json"
        if not path.exists():
            return
        for item in json.loads(path.read_text(encoding="utf-8"))["rounds"]:
            r = int(item["round"])
            if r > up_to_round:
                continue
            if item["sites"]:
                self.evaluations[r] = {site: dict(m) for site, m in item["sites"].items()}
            reports = [SiteRound(site, TRAINED) for site in item["trained"]]
            reports += [SiteRound(site, TRAINED, rejected=why) for site, why in item["rejected"].items()]
            reports += [SiteRound(site, DECLINED, reason) for site, reason in item["declined"].items()]
            for report in reports:
                report.files_skipped = int(item.get("files_skipped", {}).get(report.site, 0))
                report.warning = str(item.get("warnings", {}).get(report.site, ""))
            if reports:
                self.participation[r] = reports
            if item["failures"]:  # before what this start recorded already (its enrolment)
                self.failures[r] = [*item["failures"], *self.failures.get(r, [])]
            if item.get("left_out"):
                self.left_out[r] = list(item["left_out"])

    def round_finished(self, server_round: int) -> None:
        if self.on_round is None:
            return
        reports = self.participation.get(server_round, [])
        summary = self._round_metrics(server_round - 1)
        epsilons = [r.epsilon for r in reports if r.epsilon is not None]
        self.on_round(
            RoundProgress(
                round=server_round,
                num_rounds=self.study.rounds,
                trained=[r.site for r in reports if r.status == "trained" and not r.rejected],
                declined={r.site: r.reason for r in reports if r.status == "declined"},
                rejected={r.site: r.rejected for r in reports if r.rejected},
                failed=len(self.failures.get(server_round, [])),
                mean_site_accuracy=summary["mean_site_accuracy"],
                pooled_accuracy=summary["pooled_accuracy"],
                max_epsilon=max(epsilons) if epsilons else None,
                metric=summary["metric"],
                mean_site=summary["mean_site"],
                weighted_site_mean=summary["weighted_site_mean"],
            )
        )

    def finish(self, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
        torch.save(
            {**self.model_meta, "round": self.study.rounds, "state_dict": state_dict},
            self.run_dir / "model.pt",
        )
        metrics = self.write_metrics()
        privacy = self.write_privacy_summary()
        _write_text(self.run_dir / "model_card.md", model_card(self.study, self.model_meta, metrics, privacy))
        return metrics

    # -- files ----------------------------------------------------------------------------
    def _round_metrics(self, model_round: int) -> dict[str, Any]:
        sites = {site: _flagged(m) for site, m in self.evaluations.get(model_round, {}).items()}
        with_accuracy = [m for m in sites.values() if "accuracy" in m]
        accuracies = [m["accuracy"] for m in with_accuracy]
        total = sum(m["n"] for m in with_accuracy)
        pooled = sum(m["accuracy"] * m["n"] for m in with_accuracy) / total if total else None
        metric = task_of(self.study).headline
        scored = [m for m in sites.values() if metric in m]
        scored_n = sum(m["n"] for m in scored)
        return {
            "sites": sites,
            "mean_site_accuracy": mean_over_sites(accuracies),
            "pooled_accuracy": pooled,
            "metric": metric,
            "mean_site": mean_over_sites([m[metric] for m in scored]),
            # not the metric on all sites' rows together (AUC, C-index, R² are not means over rows,
            # and sites share no per-patient predictions): named for what it is
            "weighted_site_mean": sum(m[metric] * m["n"] for m in scored) / scored_n if scored_n else None,
        }

    def write_metrics(self) -> dict[str, Any]:
        rounds = []
        last = max([*self.evaluations, *self.participation, *self.failures, 0])
        for r in range(last + 1):
            reports = self.participation.get(r, [])
            rounds.append(
                {
                    "round": r,
                    **self._round_metrics(r),
                    "trained": [
                        s.site for s in reports if s.status == "trained" and not s.rejected
                    ],
                    "declined": {s.site: s.reason for s in reports if s.status == "declined"},
                    "rejected": {s.site: s.rejected for s in reports if s.rejected},
                    "failures": self.failures.get(r, []),
                    "left_out": self.left_out.get(r, []),
                    "files_skipped": {s.site: s.files_skipped for s in reports if s.files_skipped},
                    "warnings": {s.site: s.warning for s in reports if s.warning},
                }
            )
        metrics = {
            "study": self.study.name,
            "strategy": self.study.strategy.name,
            "model": self.study.model.name,
            "task": self.study.task,
            "metrics_shown": list(task_of(self.study).shown),
            "grad_sample_mode": self.study.training.grad_sample_mode,  # "auto" resolved for the model
            "dp": all(s.privacy.dp for s in self.study.sites)
            if self.study.sites
            else self.study.privacy.dp,
            **({"noise_seeded_for_replay": "a site seeded its DP noise for a test's replay "
                "(PMFL_REPLAY_SEED): no privacy guarantee against anyone who knows the seed"}
               if self.noise_seeded else {}),
            "note": "round r holds the evaluation of the global model after round r on each site's "
            "own test rows (round 0: the initial model). mean_site_accuracy is FLamby's metric; "
            "pooled_accuracy is the accuracy on all sites' test rows together. metric is the task's "
            "headline metric; mean_site its mean over sites, weighted_site_mean its mean weighted by each "
            "site's test rows (not the metric on the pooled rows). A site's baseline is its trivial "
            "predictor's value of that metric on the same test rows (majority class, training mean, "
            "constant risk); no_better_than_baseline says the "
            "model did not beat it there.",
            "rounds": rounds,
        }
        if self.study.personalization.enabled:
            metrics["personalization"] = {
                "method": self.study.personalization.method,
                "note": "each site's final global model and its personal model (kept at the site, never "
                "sent) on the site's own test rows; the personal steps are in the site's ledger and epsilon. "
                "fedper: no whole global model exists (each site's local layers stay at the site), so "
                "`global` is null and model.pt holds the shared layers only",
                "sites": dict(sorted(self.personal.items())),
            }
        _write_json(self.run_dir / "metrics.json", metrics)
        return metrics

    def write_privacy_summary(self) -> dict[str, Any]:
        sites: dict[str, Any] = {}
        for path in sorted(self.privacy_dir.glob("ledger-*.jsonl")):
            entries: list[LedgerEntry] = read_ledger(path)
            if entries:
                site = entries[-1].site
                sites[site] = summarize(entries)
                sites[site]["chain_head"] = chain_head(read_raw_ledger(path))
                entry = self.roster.roster.entry(site) if self.roster else None
                if entry is not None:
                    sites[site]["key_fingerprint"] = entry.key_fingerprint
        summary = {
            "study": self.study.name,
            "run": self.roster.roster.run if self.roster else None,
            "roster_digest": self.roster.roster.digest if self.roster else None,
            "privacy_unit": "one patient record at one site (sample-level DP-SGD)",
            "epsilon_is": "cumulative over every round the site ran, composed by the site's accountant",
            "dp": all(s["dp"] for s in sites.values()) if sites else self.study.privacy.dp,
            "sites": sites,
        }
        _write_json(self.privacy_dir / "summary.json", summary)
        if self.study.hospital_dp.enabled:
            self.write_hospital_dp()
        return summary

    def write_hospital_dp(self) -> dict[str, Any]:
        """The hospital-level guarantee of the aggregate, apart from the per-patient ledgers."""
        config = self.study.hospital_dp
        planned = len(self.study.sites) or self.study.strategy.min_sites
        contributions, rounds = [], []
        for r in sorted(k for k in self.participation if k > 0):
            k = sum(1 for s in self.participation[r] if s.status == "trained" and not s.rejected)
            contributions.append(k)
            rounds.append({"round": r, "contributing_sites": k,
                           "epsilon": hospital_epsilon(contributions, planned, config)})
        report = {
            "privacy_unit": "one hospital's whole dataset (hospital-level DP of the aggregate, DP-FedAvg)",
            "not_additive": "a different unit from the per-patient ledgers: never add the two epsilons",
            "accountant": "rdp (dp-accounting), Gaussian mechanism per round, no sampling amplification",
            "clip_norm": config.clip_norm,
            "noise_multiplier": config.noise_multiplier,
            "planned_sites": planned,
            "delta": config.delta,
            "epsilon": rounds[-1]["epsilon"] if rounds else 0.0,
            "against_the_coordinator": (
                "holds: secure aggregation is on, the coordinator sees only the noisy sum (honest-but-"
                "curious coordinator colluding with fewer sites than the reconstruction threshold)"
                if self.study.secure_aggregation.enabled else
                "holds for what the coordinator sees only with secure aggregation on; without it, each "
                f"site's own update carries noise multiplier {config.noise_multiplier / planned**0.5:.3g}"),
            "rounds": rounds,
        }
        _write_json(self.privacy_dir / "hospital_dp.json", report)
        return report
