"""Record keys both sides of a study agree on: what the coordinator asks and what a site replies.

Only model arrays and aggregate metrics cross the wire; a site's ledger line travels as text so
the coordinator stores it byte for byte as the site wrote it. Arrays travel packed into one record
each (pm_common/wire/packing.py): every record is one request to and from the SuperLink.
"""

from __future__ import annotations

ARRAYS = "arrays"  # Flower's own key for a strategy's ArrayRecord (never on pmfl's wire)
CONFIG = "config"
MODEL = "model"  # packed ConfigRecord: the global model sent, or the model a site trained
PACKED = "packed"  # in a packed record: the arrays' bytes back to back
LAYOUT = "layout"  # in a packed record: their names, shapes and dtypes (JSON)
TRAIN_METRICS = "metrics"  # the MetricRecord Flower strategies aggregate (holds NUM_EXAMPLES)
EVAL_PREFIX = "eval-"  # in TRAIN_METRICS: the received global model on the site's test set
SITE = "site"  # ConfigRecord: SITE_NAME, STATUS, REASON, LEDGER_LINE
NUM_EXAMPLES = "num-examples"

SITE_NAME = "name"
STATUS = "status"
REASON = "reason"
LEDGER_LINE = "ledger-line"  # the site's signed, hash-chained ledger line for the round
EPSILON = "epsilon"

# Secure aggregation (pm_common/secagg/primitives.py): the stage requests and replies, the
# training message's relayed shares, and the masked update (packed) a site sends instead of MODEL.
SECAGG = "secagg"
SECAGG_ACTION = "secagg"
SECAGG_MESSAGE = f"query.{SECAGG_ACTION}"
MASKED = "masked"

# Enrolment (pm_common/records/roster.py): before round 1 the coordinator asks every site to declare
# itself ("declare": name, ledger key, budget), then to sign the run's roster ("sign").
ENROLL = "enroll"  # ConfigRecord of an enrolment request and of its reply
ENROLL_ACTION = "enroll"
ENROLL_MESSAGE = f"query.{ENROLL_ACTION}"
STAGE = "stage"
DECLARE, SIGN = "declare", "sign"
ROSTER = "roster"  # the roster, JSON (sign request)
ROSTER_ENTRY = "roster-entry"  # the site's own entry, JSON (declare reply)
ROSTER_SIGNATURE = "roster-signature"  # the site's signature over the roster digest (sign reply)
LEDGER_LINES = "ledger-lines"  # the site's whole ledger for the study, as it holds it
CLOSE = "close"  # in the final evaluation's config: the site closes its ledger for the run
PERSONAL_METRICS = "personal-metrics"  # final evaluation reply: the site's personal model on its test rows
PERSONAL_MODEL = "personal-model"  # in a site's record: where its personal model lies (at the site)
PERSONAL_REASON = "personal-reason"  # in a site's record: why it trained no personal model

# Keys of the coordinator's train config.
RUN = "run"  # the run's id (its roster's `run`)
ATTEMPT = "attempt"  # the coordinator's attempt at the run: 0, then one more per restart
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-rounds"
STUDY_TOML = "study-toml"  # the study config as text: contract, model and training for the sites
PROXIMAL_MU = "proximal-mu"
PLANNED_SITES = "planned-sites"  # how many sites share the hospital-level DP noise
NEXT_ROUND_FITS = "next-round-fits"  # whether the site's budget allows one more round
NOISE_SEEDED = "noise-seeded"  # in a site's record: noise seeded for a test's replay (client/replay.py)
WARNING = "warning"  # in a site's record: what the site wants the study to know (e.g. too few rows)
FILES_SKIPPED = "files-skipped"  # unusable image files the site left out (its on_bad_file = "skip")
