"""What a run would take from this hospital, before it runs: `mammofl-hospital preflight`.

From the run config the coordinator announces and the node's own config (data, ledger, policy), without training:
the reply keys and metric names that would leave the node, the model's size and bytes per update, the DP
parameters the node would use, the epsilon the whole run would cost on top of what the ledger already holds
(training rounds, noised evaluations, the explanation query), and whether the node's policy allows it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from client.node import hospital_data, local_train_config, secure_train_config
from client.privacy_ledger import PrivacyLedger
from client.training import plan_dp_round
from common import private_counts, wire
from common.distributed_dp import reconstruction_threshold
from common.models import build_model
from common.privacy import PrivacyAccountant
from common.run_config import NodeConfig, RunConfig
from common.weights import exchanged_weights


@dataclass(frozen=True)
class Preflight:
    """The plan of one run at this node (see the module doc); `refusals` empty means the policy allows it."""

    allowed: bool
    refusals: list[str]
    train_images: int
    validation_images: int
    model: dict
    dp: dict
    releases: dict  # planned releases: training rounds, evaluations, explanation queries
    epsilon_now: float
    epsilon_after: float
    max_epsilon: float
    budget_basis: str
    sends: dict = field(default_factory=dict)  # message kind -> keys that leave the node

    def to_json(self) -> dict:
        return asdict(self)


def planned_evaluations(run: RunConfig) -> int:
    """Federated evaluations the coordinator will ask for (every `evaluate-every` rounds and the last)."""
    if run.fraction_evaluate == 0:
        return 0
    rounds = run.num_server_rounds
    return rounds // run.evaluate_every + (0 if rounds % run.evaluate_every == 0 else 1)


def preflight(run: RunConfig, node: NodeConfig) -> Preflight:
    """Plan `run` at `node` (loads the node's data from its caches; trains nothing, spends nothing)."""
    policy = node.policy
    delta = policy.accounting_delta(run.delta)
    ledger = PrivacyLedger(node.ledger_path, mechanism=policy.accountant)
    data = hospital_data(node, run)
    weights = exchanged_weights(build_model(run.model_config()))
    parameters = sum(int(v.size) for v in weights.values())
    refusals = []
    objection = policy.training_refusal(dp=run.dp, noise_multiplier=run.noise_multiplier,
                                        num_server_rounds=run.num_server_rounds, rounds_trained=0)
    if objection:
        refusals.append(objection)
    distributed = run.distributed_dp
    if distributed:
        threshold = reconstruction_threshold(run.min_nodes, run.secagg_dropouts)
        config = secure_train_config(run, server_round=1, threshold=threshold, policy=policy)
        own_noise = config.dp.noise_multiplier
        seen_noise = own_noise * math.sqrt(threshold)
        if run.min_nodes - threshold > policy.secagg_max_dropouts:
            refusals.append(f"refused: run config 'secagg-dropouts' {run.secagg_dropouts} lets the secure sum be "
                            f"revealed with {run.min_nodes - threshold} hospitals missing; this node's policy "
                            f"allows at most {policy.secagg_max_dropouts} (secagg-max-dropouts)")
    else:
        config = local_train_config(run, server_round=1, policy=policy)
        own_noise = seen_noise = run.noise_multiplier
    plan = plan_dp_round(len(data.train), config=config)
    evaluations = planned_evaluations(run) if policy.evaluation != "refuse" else 0
    if evaluations > policy.max_evaluations_per_run:
        refusals.append(f"refused: the run would ask for {evaluations} evaluations; this node's policy "
                        f"max-evaluations-per-run is {policy.max_evaluations_per_run} (later ones are refused)")
        evaluations = policy.max_evaluations_per_run
    explanations = 1 if run.explain_method_names and policy.evaluation != "refuse" else 0
    counted = (evaluations + explanations) if policy.evaluation == "noised" else 0
    on_aggregate = policy.budget_on_aggregate and distributed
    history = ledger.aggregate_history if on_aggregate else ledger.history
    accountant = PrivacyAccountant(policy.accountant, history=[list(h) for h in history])
    epsilon_now = accountant.epsilon(delta)
    if run.dp:
        accountant.step(noise_multiplier=seen_noise if on_aggregate else own_noise, sample_rate=plan.sample_rate,
                        steps=plan.steps * run.num_server_rounds)
    if counted:
        accountant.step(noise_multiplier=policy.evaluation_noise_multiplier,
                        sample_rate=private_counts.RELEASE_SAMPLE_RATE, steps=counted * private_counts.RELEASE_STEPS)
    epsilon_after = accountant.epsilon(delta) if run.dp else math.inf
    if epsilon_after > policy.max_epsilon:
        refusals.append(f"refused: the whole run would take epsilon from {epsilon_now:.3f} to {epsilon_after:.3f}, "
                        f"above this node's max-epsilon {policy.max_epsilon:g} (rounds past the budget are refused)")
    evaluate_keys = [wire.NUM_EXAMPLES, wire.EVALUATION_NOISE, *(wire.confusion_key(i, j) for i in range(3)
                                                                   for j in range(3))]
    if policy.evaluation == "clear":
        evaluate_keys += [wire.EVAL_LOSS, "auc_malignant", "auc_benign_vs_malignant", "accuracy", "precision",
                          "recall", "specificity", "f1_macro"]
    sends = {
        "train": list(wire.SECURE_TRAIN_METRIC_KEYS if distributed else wire.TRAIN_METRIC_KEYS)
        + [f"{'masked gradient sum' if distributed else 'weights'}: {len(weights)} arrays"],
        "evaluate": evaluate_keys + [f"{wire.SCORE_HISTOGRAM} (last round only)"],
        "explanations": [wire.EXPLAINED_IMAGES, wire.EXPLAIN_BASELINE_SUM,
                         *(wire.explain_key(m, q) for m in run.explain_method_names for q in ("hits", "mass-sum"))],
        "refusal": list(wire.REFUSAL_METRIC_KEYS) + [wire.REASON],
    }
    return Preflight(
        allowed=not refusals, refusals=refusals, train_images=len(data.train), validation_images=len(data.val),
        model={"kind": run.model, "parameters": parameters, "bytes_per_update_float32": 4 * parameters},
        dp={"mode": "distributed (SecAgg+)" if distributed else "local", "enabled": run.dp,
            "noise_multiplier_own": own_noise, "noise_multiplier_seen": seen_noise,
            "max_grad_norm": run.max_grad_norm, "sample_rate": plan.sample_rate, "steps_per_round": plan.steps,
            "delta": delta, "accountant": policy.accountant},
        releases={"training_rounds": run.num_server_rounds, "evaluations": evaluations,
                  "explanation_queries": explanations, "evaluation": policy.evaluation,
                  "evaluation_noise_multiplier": policy.evaluation_noise_multiplier},
        epsilon_now=epsilon_now, epsilon_after=epsilon_after, max_epsilon=policy.max_epsilon,
        budget_basis="secure sum" if on_aggregate else "own noise", sends=sends)
