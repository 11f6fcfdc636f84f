"""Self-contained HTML report of a privacy audit (audit/report.html).

One file with no external assets (plots are embedded PNGs), so it can be attached to an ethics
board's record and opened offline years later. Every string from a ledger is HTML-escaped: ledger
lines come from sites and are untrusted input. Matplotlib is used through `Figure` directly, never
pyplot, so rendering neither needs a display nor changes the caller's global backend.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pm_common.audit.one_run import REFERENCE as EMPIRICAL_REFERENCE
from pm_common.audit.rules import (
    NOTE,
    PLD_DISCRETIZATION,
    PRIVACY_UNIT,
    REPORTED_RTOL,
    UNVERIFIABLE,
    VIOLATION,
    AuditResult,
    SiteAudit,
)

NOT_COVERED = (
    "Aggregate metrics that sites send every round (accuracy, loss, AUC, example counts) are not "
    "protected by differential privacy.",
    "Hospital-level membership is not protected: sample-level DP hides one patient record at one "
    "site, not whether a hospital took part or its overall data distribution.",
    "Model updates are protected only through DP-SGD at each site; the coordinator's aggregation "
    "adds no privacy of its own.",
    "A hash chain cannot by itself show that lines were removed from the end of a ledger: each site "
    "closes its ledger for the run at the end, and a ledger without its closing line cannot be verified "
    "to the end except against the site's own copy (--site).",
    "The run's roster is signed by every site on it, so no site can be removed, added or re-keyed "
    "without breaking those signatures; that the roster's keys are the hospitals' real keys is shown "
    "only by something outside the run directory: a pinned roster digest or a hospital's own records.",
    "The guarantee is per site: a patient whose records sit at several sites is covered by the "
    "composition of those sites' guarantees, not by one of them.",
)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def epsilon_plot(sites: Sequence[SiteAudit]) -> str | None:
    """Base64 PNG: cumulative epsilon per site per round (recomputed RDP, reported, budget).

    Plotting the recomputed figure next to the reported one shows at a glance where a site
    under-reports, and the budget line where it overspends.

    Args:
        sites: The audited sites; only those with DP and at least one round are plotted.

    Returns:
        The PNG as base64, or None when no site has a DP round to plot.
    """
    dp_sites = [s for s in sites if s.dp and s.rounds]
    if not dp_sites:
        return None
    fig = Figure(figsize=(8.0, 4.2))
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(dp_sites))]
    for site, color in zip(dp_sites, colors, strict=True):
        rounds = [r.round for r in site.rounds]
        rdp = [r.rdp_epsilon if r.rdp_epsilon is not None and math.isfinite(r.rdp_epsilon)
               else float("nan") for r in site.rounds]
        reported = [r.reported_epsilon if r.reported_epsilon is not None else float("nan")
                    for r in site.rounds]
        ax.plot(rounds, rdp, "-", color=color, label=f"{site.site} (recomputed RDP)")
        ax.plot(rounds, reported, "o", color=color, markersize=4, fillstyle="none",
                label=f"{site.site} (reported)")
        if site.epsilon_budget is not None:
            ax.axhline(site.epsilon_budget, color=color, linestyle="--", linewidth=1,
                       label=f"{site.site} budget")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Cumulative ε per site: line = recomputed RDP, circles = reported, dashed = budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return _png(fig)


def _plotted(value: Any) -> float:
    """A metrics.json value as a point of a plot (NaN, a gap, where it is not a number: metrics.json
    is not signed, and a malformed value must not stop an audit)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return float("nan")


def accuracy_plot(accuracy: Sequence[dict[str, Any]]) -> str | None:
    """Base64 PNG: the task's headline metric per round (accuracy for yes/no studies), mean over sites
    and pooled (accuracy) or weighted by test rows (other metrics).

    Shown so a reader can weigh the privacy spent against what the model gained.

    Args:
        accuracy: One dict per round with `round`, the headline `metric`'s name and, when known, its
            mean over sites and pooled or row-weighted value.

    Returns:
        The PNG as base64, or None when there is nothing to plot.
    """
    if not accuracy:
        return None
    rounds = [a["round"] for a in accuracy]
    metric = str(accuracy[-1].get("metric", "accuracy"))
    keys = ((("mean_site_accuracy", "mean over sites"), ("pooled_accuracy", "pooled")) if metric == "accuracy"
            else (("mean_site", "mean over sites"), ("weighted_site_mean", "mean weighted by test rows")))
    fig = Figure(figsize=(8.0, 3.4))
    ax = fig.subplots()
    for key, label in keys:
        values = [_plotted(a.get(key)) for a in accuracy]
        ax.plot(rounds, values, "o-", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title(f"Test {metric} per round (metrics.json; not covered by DP)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _verdict_class(result: AuditResult) -> str:
    return {0: "pass", 1: "fail", 2: "unknown"}.get(result.exit_code, "unknown")


def _site_rows(sites: Sequence[SiteAudit]) -> str:
    rows = []
    for s in sites:
        chain = ("verified" if s.chain_verified else
                 "NOT verified" if s.chain is not None else "no key")
        fp = s.chain.key_fingerprint[:16] + "…" if s.chain else ""
        rows.append(
            "<tr>"
            f"<td>{escape(s.site)}</td>"
            f"<td class='v-{escape(s.verdict.replace(' ', '-'))}'>{escape(s.verdict)}</td>"
            f"<td>{escape(chain)}<br><small>{escape(fp)}</small></td>"
            f"<td>{len(s.rounds)}</td>"
            f"<td>{_num(s.reported_epsilon)}</td>"
            f"<td>{_num(s.rdp_epsilon)}</td>"
            f"<td>{_num(s.pld_epsilon)}</td>"
            f"<td>{escape(f'{s.delta:g}') if s.delta is not None else '—'}</td>"
            f"<td>{_num(s.epsilon_budget)}</td>"
            f"<td>{escape(s.accountant or '—')}</td>"
            f"<td>{'yes' if s.dp else '<b>NO</b>'}</td>"
            "</tr>"
        )
    return "\n".join(rows)


def _findings(result: AuditResult) -> str:
    if not result.findings:
        return "<p>No findings.</p>"
    items = []
    for severity, label in ((VIOLATION, "violation"), (UNVERIFIABLE, "cannot verify"),
                            (NOTE, "note")):
        for f in result.findings:
            if f.severity == severity:
                items.append(f"<li class='f-{severity}'><b>{label}</b> "
                             f"<code>{escape(f.code)}</code> {escape(f.message)}</li>")
    return "<ul class='findings'>" + "\n".join(items) + "</ul>"


def _empirical(result: AuditResult) -> str:
    head = ("<section id='empirical-audit'><h2>Empirical check: one-run audit</h2>"
            f"<p>Method: {escape(EMPIRICAL_REFERENCE)}. Canaries are inserted at random "
            "(each with probability 1/2); an attacker guesses which were trained on. The result "
            "is a statistical <em>lower</em> bound on ε: it can expose a broken implementation "
            "(a lower bound above the accounted ε), never certify privacy.</p>")
    if result.empirical is None:
        return head + ("<p class='muted'>Not run: <code>privacy/empirical_audit.json</code> "
                       "is absent.</p></section>")
    accounted = {s.site: s.rdp_epsilon for s in result.sites}
    rows = []
    for item in result.empirical:
        bound = item.get("epsilon_lower_bound")
        claimed = item.get("epsilon_claimed", accounted.get(str(item.get("site"))))
        rows.append(
            "<tr>"
            f"<td>{escape(str(item.get('site', item.get('label', 'run'))))}"
            f"{' (positive control)' if item.get('control') else ''}</td>"
            f"<td>{escape(str(item.get('canaries', '—')))}</td>"
            f"<td>{escape(str(item.get('guesses', '—')))}</td>"
            f"<td>{escape(str(item.get('correct', '—')))}</td>"
            f"<td>{escape(str(item.get('delta', '—')))}</td>"
            f"<td>{escape(str(item.get('confidence', '—')))}</td>"
            f"<td>{'∞' if bound is None and item.get('unbounded') else escape(_num(bound))}</td>"
            f"<td>{escape(_num(claimed))}</td>"
            "</tr>"
        )
    return head + (
        "<table><tr><th>site</th><th>canaries m</th><th>guesses r</th><th>correct v</th>"
        "<th>δ</th><th>confidence</th><th>ε lower bound</th><th>accounted ε</th></tr>"
        + "\n".join(rows) + "</table></section>"
    )


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1em}
h1{margin-bottom:.2em}.muted{color:#666}
.verdict{padding:1em 1.2em;border-radius:6px;font-size:1.15em;font-weight:600;margin:1em 0}
.pass{background:#e3f5e6;border:2px solid #2e7d32}.fail{background:#fdecea;border:2px solid #c62828}
.unknown{background:#fff6e0;border:2px solid #ef8f00}
table{border-collapse:collapse;width:100%;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.v-violation,.v-no-DP{color:#c62828;font-weight:600}
.v-verified{color:#2e7d32;font-weight:600}.v-cannot-verify{color:#ef8f00;font-weight:600}
.f-violation{color:#b71c1c}.f-unverifiable{color:#9a5b00}.f-note{color:#555}
img{max-width:100%}section{margin-top:1.6em}code{font-size:.9em}
"""


def render_report(result: AuditResult) -> str:
    """The report as one HTML string.

    Self-contained (CSS inline, plots embedded) and with every ledger-derived string escaped, so it
    can be archived and opened offline without trusting what the sites wrote.

    Args:
        result: The audit's result.

    Returns:
        The complete HTML document.
    """
    deltas = sorted({s.delta for s in result.sites if s.delta is not None})
    accountants = sorted({s.accountant for s in result.sites if s.accountant})
    eps_png = epsilon_plot(result.sites)
    acc_png = accuracy_plot(result.accuracy)
    eps_img = (f"<img alt='cumulative epsilon per site' src='data:image/png;base64,{eps_png}'>"
               if eps_png else "<p class='muted'>No DP rounds to plot.</p>")
    acc_img = (f"<img alt='accuracy per round' src='data:image/png;base64,{acc_png}'>"
               if acc_png else "<p class='muted'>No metrics.json in this directory.</p>")
    not_covered = "".join(f"<li>{escape(x)}</li>" for x in NOT_COVERED)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pmfl privacy audit</title><style>{CSS}</style></head>
<body>
<h1>Privacy audit</h1>
<p class="muted">{escape(result.kind)} directory <code>{escape(result.path)}</code>,
audited {escape(result.generated_at)}; exit code {result.exit_code}.</p>
<div id="verdict" class="verdict {_verdict_class(result)}">{escape(result.verdict)}</div>
<p><b>Verified against:</b> {escape("; ".join(result.verified_against) or "nothing")}<br>
<b>Run:</b> <code>{escape(result.run or "—")}</code>, roster digest
<code>{escape(result.roster_digest or "—")}</code></p>

<section id="scope"><h2>What is guaranteed</h2>
<ul>
<li><b>Privacy unit:</b> {escape(PRIVACY_UNIT)}.</li>
<li><b>δ:</b> {escape(", ".join(f"{d:g}" for d in deltas) or "—")} per site.</li>
<li><b>Accountant declared by the sites:</b> {escape(", ".join(accountants) or "—")}
(Opacus, Poisson-sampled Gaussian DP-SGD, ε cumulative over all rounds).</li>
<li><b>Independent recomputation:</b> Google dp-accounting from each ledger line's own
(noise multiplier, sample rate, steps): RDP (the figure compared with the sites' RDP; a reported ε
more than {REPORTED_RTOL:.0%} below it is under-reported) and PLD (tight, value discretization
{PLD_DISCRETIZATION:g}).</li>
<li><b>Integrity:</b> every ledger line is signed by its site's Ed25519 key and chained by SHA-256;
keys come from the run's roster, which every site on it signed before round 1.</li>
</ul></section>

<section id="findings"><h2>Findings</h2>{_findings(result)}</section>

<section id="sites"><h2>Sites</h2>
<table><tr><th>site</th><th>audit</th><th>signed chain</th><th>rounds</th><th>reported ε</th>
<th>recomputed RDP ε</th><th>PLD ε (tight)</th><th>δ</th><th>budget ε</th><th>accountant</th>
<th>DP</th></tr>
{_site_rows(result.sites)}
</table></section>

<section id="epsilon-plot"><h2>Cumulative ε per round</h2>{eps_img}</section>
<section id="accuracy-plot"><h2>Test metric per round</h2>{acc_img}</section>

<section id="not-covered"><h2>What this guarantee does not cover</h2><ul>{not_covered}</ul>
</section>

<!-- EMPIRICAL AUDIT: filled from privacy/empirical_audit.json when it exists -->
{_empirical(result)}
</body></html>
"""


def write_report(result: AuditResult, path: Path) -> Path:
    """Render the report and write it to `path`, creating its directory when missing.

    Args:
        result: The audit's result.
        path: Where to write the HTML (usually audit/report.html).

    Returns:
        `path`, for the caller to print or link.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(result), encoding="utf-8")
    return path
