"""Record keys both sides of a study agree on: what the coordinator asks and what a site replies.

Only model arrays and aggregate metrics cross the wire; a site's ledger line travels as text so
the coordinator stores it byte for byte as the site wrote it. Arrays travel packed into one record
each (pm_common/wire.py): every record is one request to and from the SuperLink.
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
LEDGER_PUBLIC_KEY = "ledger-public-key"  # PEM of the key that verifies the site's ledger
EPSILON = "epsilon"

# Secure aggregation (pm_common/secure_aggregation.py): the stage requests and replies, the
# training message's relayed shares, and the masked update (packed) a site sends instead of MODEL.
SECAGG = "secagg"
SECAGG_ACTION = "secagg"
SECAGG_MESSAGE = f"query.{SECAGG_ACTION}"
MASKED = "masked"

# Keys of the coordinator's train config.
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-rounds"
STUDY_TOML = "study-toml"  # the study config as text: contract, model and training for the sites
PROXIMAL_MU = "proximal-mu"
PLANNED_SITES = "planned-sites"  # how many sites share the hospital-level DP noise
NEXT_ROUND_FITS = "next-round-fits"  # whether the site's budget allows one more round
FILES_SKIPPED = "files-skipped"  # unusable image files the site left out (its on_bad_file = "skip")
