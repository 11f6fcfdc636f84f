"""The model card written beside model.pt: what the model is, what it was trained and measured on,
what each hospital spent for it, and what it must not be used for.

Why: a model file alone invites use beyond what the run supports. Everything on the card comes from
the run's own records (metrics.json, privacy/summary.json, the study), nothing from elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pm_common.study.config import StudyConfig

NOT_FOR = (
    "Clinical decisions about an individual patient: the model is a research result, not a validated "
    "medical device, and was measured only on the participating sites' held-out rows.",
    "Populations, sites or data collection unlike the participating sites' (other hospitals, other "
    "periods, other coding of the inputs) without a new evaluation there.",
    "Inputs outside the study's contract: rows must pass the same contract (columns, ranges, categories).",
    "Claims of privacy beyond the ledger: each site's guarantee is the (epsilon, delta) above, for one "
    "patient record at that site; it says nothing about hospital-level or population-level inference.",
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def model_card(study: StudyConfig, meta: Mapping[str, Any], metrics: Mapping[str, Any],
               privacy: Mapping[str, Any]) -> str:
    """The card's Markdown text.

    Args:
        study: the study the run trained.
        meta: what model.pt records of the model (task, model, inputs).
        metrics: metrics.json's content.
        privacy: privacy/summary.json's content.

    Returns:
        model_card.md's text.
    """
    rounds = metrics.get("rounds", [])
    final = rounds[-1] if rounds else {}
    sites: Mapping[str, Mapping[str, float]] = final.get("sites", {})
    lines = [
        f"# Model card: {study.name}",
        "",
        f"- Task: {meta.get('task', study.task)}; model: {study.model.name}; rounds: {study.rounds}; "
        f"strategy: {study.strategy.name}; personalisation: {study.personalization.method}.",
        f"- Privacy: {'DP-SGD at every site' if privacy.get('dp') else 'NO differential privacy'} "
        f"(unit: {privacy.get('privacy_unit', 'one patient record at one site')}).",
    ]
    inputs = meta.get("inputs")
    if inputs:
        lines.append(f"- Inputs ({len(inputs)} after encoding by the study's contract): "
                     + ", ".join(str(i) for i in inputs) + ".")
    lines += ["", "## Per site", "",
              "Test rows and metrics as each site reported them for the final model (a site sends no "
              "metrics over fewer rows than the study's min_report_count); ε as its signed ledger gives it.",
              "", "| site | test rows | accuracy | AUC | ε spent | ε budget | status |",
              "|---|---|---|---|---|---|---|"]
    spent = privacy.get("sites", {})
    for site in sorted({*sites, *spent}):
        m, s = sites.get(site, {}), spent.get(site, {})
        n = m.get("n")
        lines.append(f"| {site} | {int(n) if n is not None else '-'} | {_fmt(m.get('accuracy'))} | "
                     f"{_fmt(m.get('auc'))} | {_fmt(s.get('epsilon'))} | {_fmt(s.get('epsilon_budget'))} | "
                     f"{s.get('status', '-')} |")
    personal = metrics.get("personalization")
    if personal:
        lines += ["", f"Personal models ({personal.get('method')}) stay at each site, never sent; their "
                  "metrics are in metrics.json `personalization`."]
        if study.personalization.local_layers:
            lines.append("fedper: model.pt holds the shared layers only ("
                         + ", ".join(study.personalization.local_layers) + " stay at the sites): it is not "
                         "a complete model on its own.")
    lines += ["", "## Must not be used for", "", *(f"- {item}" for item in NOT_FOR), ""]
    return "\n".join(lines)
