"""Names of everything that crosses the wire between coordinator and hospital nodes.

Server and client both import these constants, so a renamed key breaks both sides at once instead of silently
dropping a value. Only arrays (model weights) and scalar aggregate numbers travel; this module lists all of them.

Message layout (Flower Message API):

- instruction (server -> node): ``RecordDict({ARRAYS: ArrayRecord(global weights), CONFIG: ConfigRecord})``;
  the config carries ``SERVER_ROUND`` (and ``PROXIMAL_MU`` under FedProx), the rest of the settings come from the
  run config that every node receives with the run.
- train reply: ``{ARRAYS: ArrayRecord(local weights), METRICS: MetricRecord(TRAIN_METRIC_KEYS)}``.
- refusal reply (node budget exhausted): ``{METRICS: MetricRecord(REFUSAL_METRIC_KEYS), REFUSAL:
  ConfigRecord({REASON: str})}`` and no arrays (MetricRecords hold numbers only, so the reason travels apart).
- evaluate reply: ``{METRICS: MetricRecord(NUM_EXAMPLES, EVALUATION_NOISE, confusion counts)}`` (by default
  the counts carry Gaussian noise charged to the node's budget; a node whose policy releases them in clear adds
  EVAL_LOSS and the metric names), plus ``SCORE_HISTOGRAM`` when the instruction's config sets
  ``WANT_SCORE_HISTOGRAM`` (the last round's evaluation, from which the coordinator chooses the operating point).

Distributed noise over secure aggregation (``common.distributed_dp``) runs on Flower's SecAgg+ protocol, whose
messages use Flower's legacy layout (``fitins.*`` / ``fitres.*`` records plus SecAgg+'s own config record). The
instruction's parameters are the global weights in ``weight-keys`` order (``SECURE_CONFIG``); a node's reply
parameters are its noised clipped gradient sum in clip units, which the SecAgg+ mod masks and removes from the
reply before it leaves the node; its metrics are ``SECURE_TRAIN_METRIC_KEYS`` (no train loss, and a weight of 1:
the Poisson batch size must not leak).
"""

from __future__ import annotations

from common.records import CLASS_NAMES

# ---------------------------------------------------------------- records inside a Message
ARRAYS = "arrays"  # ArrayRecord: model weights (plain state_dict keys, no `_module.` prefix)
CONFIG = "config"  # ConfigRecord: per-round instructions from the server
METRICS = "metrics"  # MetricRecord: numbers a node reports
REFUSAL = "refusal"  # ConfigRecord: why a node did not train

# ---------------------------------------------------------------- per-round config (server -> node)
SERVER_ROUND = "server-round"  # injected by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # injected by Flower's FedProx
WANT_SCORE_HISTOGRAM = "score-histogram"  # evaluate instruction: 1 = reply with SCORE_HISTOGRAM too
WEIGHT_KEYS = "weight-keys"  # secure rounds: names of the legacy parameters list, in order (`join_keys`)
RUN_KEY = "run-key"  # train instruction: the run's identity across coordinator restarts (its run directory's key)

# ---------------------------------------------------------------- train reply metrics (node -> server)
NUM_EXAMPLES = "num-examples"  # weight of the reply in averaging (Flower's default `weighted_by_key`)
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # the node's cumulative epsilon (all rounds, all runs) at DELTA, of the noise the coordinator sees
EPSILON_OWN_NOISE = "epsilon-own-noise"  # the same for the node's own noise alone (equal with local noise)
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"  # the noise the node adds (its share, with distributed noise)
AGGREGATE_NOISE_MULTIPLIER = "aggregate-noise-multiplier"  # noise in what the coordinator sees (at least)
MAX_GRAD_NORM = "max-grad-norm"
STEPS = "steps"  # cumulative DP-SGD steps recorded in the node's ledger
DP_ENABLED = "dp-enabled"  # 1.0 / 0.0
REFUSED = "refused"  # 1.0 in a refusal reply, 0.0 otherwise
PARTITION_ID = "partition-id"  # simulation only: which virtual hospital replied (a number, never a name)
MAX_EPSILON = "max-epsilon"  # the node's own budget (reported with a refusal)
ACCOUNTANT = "accountant"  # optional: the node's accountant, as its index in common.node_policy.ACCOUNTANTS

# ---------------------------------------------------------------- federated explanations (query messages)
#: Query instruction: ``{ARRAYS: global weights, CONFIG: {EXPLAIN_METHODS: "cell_scores,grad_cam"}}``. The node
#: explains the model on its own validation images that carry lesion annotations; heatmaps stay on its disk.
#: Reply: ``{METRICS: {EXPLAINED_IMAGES, EXPLAIN_BASELINE_SUM, explain_key(method, "hits"|"mass-sum") ...}}``:
#: counts and sums over images (rates are formed at the coordinator from the pooled sums).
EXPLAIN_METHODS = "explain-methods"
EXPLAINED_IMAGES = "explained-images"  # images with a lesion annotation that were explained
EXPLAIN_BASELINE_SUM = "explain-baseline-sum"  # sum over images of the lesion's share of the breast area


def explain_key(method: str, quantity: str) -> str:
    """Reply metric of one method: "hits" (pointing game) or "mass-sum" (attribution share inside the lesion)."""
    return f"explain-{method}-{quantity}"


# ---------------------------------------------------------------- refusal record
REASON = "reason"

# ---------------------------------------------------------------- evaluate reply metrics (node -> server)
EVAL_LOSS = "eval-loss"
#: Metric names of `common.metrics` (auc_malignant, accuracy, ...) travel unchanged; an undefined metric (None
#: there, e.g. an AUC on a split with one class) is left out of the reply.
#: Confusion-matrix counts `cm_<true class>_<predicted class>` (as `common.metrics.scalar_metrics` writes them):
#: counts are aggregate numbers, and summing them over hospitals gives the exact pooled confusion matrix.
CONFUSION_PREFIX = "cm_"
#: Counts of validation images per (true class, more probable non-malignant class, P(malignant) bin): a list of
#: ints, ``common.operating_point.ScoreHistogram.flat`` order; summed over hospitals it is the pooled histogram.
SCORE_HISTOGRAM = "score-histogram"
#: Standard deviation of the Gaussian noise on every count of the reply (confusion counts, histogram); 0 = exact.
#: Noised counts are integers that may be negative: the coordinator sums them, then clips the pooled counts.
#: An evaluation the node refuses (its policy) is a reply with REFUSED = 1, NUM_EXAMPLES = 0 and a REFUSAL record.
EVALUATION_NOISE = "evaluation-noise"


def join_keys(keys: list[str]) -> str:
    """Weight names as one legacy config string (legacy configs hold scalars, not lists)."""
    if any("," in key for key in keys):
        raise ValueError("weight names must not contain ','")
    return ",".join(keys)


def split_keys(text: str) -> list[str]:
    """The weight names `join_keys` wrote."""
    return text.split(",") if text else []


def confusion_key(true_index: int, predicted_index: int) -> str:
    """Metric name of one confusion-matrix cell (class indices in CLASS_NAMES order)."""
    return f"{CONFUSION_PREFIX}{CLASS_NAMES[true_index]}_{CLASS_NAMES[predicted_index]}"


def confusion_cell(key: str) -> tuple[int, int] | None:
    """(true index, predicted index) of a confusion metric name, None for any other name."""
    for i in range(len(CLASS_NAMES)):
        for j in range(len(CLASS_NAMES)):
            if key == confusion_key(i, j):
                return i, j
    return None


#: Keys every (non-refusal) train reply carries.
TRAIN_METRIC_KEYS: tuple[str, ...] = (
    NUM_EXAMPLES,
    TRAIN_LOSS,
    EPSILON,
    EPSILON_OWN_NOISE,
    DELTA,
    NOISE_MULTIPLIER,
    AGGREGATE_NOISE_MULTIPLIER,
    MAX_GRAD_NORM,
    STEPS,
    DP_ENABLED,
    REFUSED,
)
#: Keys every secure (distributed-noise) train reply carries: no train loss, NUM_EXAMPLES always 1.
SECURE_TRAIN_METRIC_KEYS: tuple[str, ...] = tuple(k for k in TRAIN_METRIC_KEYS if k != TRAIN_LOSS)
#: Keys every refusal reply carries.
REFUSAL_METRIC_KEYS: tuple[str, ...] = (NUM_EXAMPLES, REFUSED, EPSILON, EPSILON_OWN_NOISE, DELTA, MAX_EPSILON,
                                        STEPS)
