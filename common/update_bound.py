"""How far one round of local DP-SGD can move the weights: the coordinator's default update-norm bound.

A hospital's round (``client.training.train_local`` with DP on) is ``T = epochs * ceil(n / B)`` plain SGD steps
(learning rate ``lr``, no momentum, no weight decay) with Poisson sampling at rate ``q = 1 / ceil(n / B)``. Each
step adds to the weights

    -lr / b_exp * (sum of the batch's per-sample gradients, each clipped to norm C  +  N(0, (sigma C)^2 I_d))

where ``b_exp = floor(n q)`` is the expected batch size Opacus divides by. The distance from the round's start is
therefore at most

    lr / b_exp * ( C * S  +  || N(0, T (sigma C)^2 I_d) || )

with ``S`` the number of examples drawn over the round (triangle inequality on the clipped part; the noise of all
steps sums to one Gaussian because it does not depend on the weights). With failure probability ``p`` split over
the two random terms (``t = ln(2 / p)``):

- ``S ~ Binomial(n T, q)``, mean ``mu = n * epochs``: Bernstein gives ``S <= mu + sqrt(2 mu t) + 2 t / 3``;
- ``||N(0, s^2 I_d)|| <= s (sqrt(d) + sqrt(2 t))`` (Gaussian concentration of a 1-Lipschitz function).

``d`` is the number of floating-point values exchanged (an upper bound on the trained, noised parameters: frozen
ones do not move). FedProx's proximal pull after each step (``w -= lr mu (w - w_start)``) only shrinks the distance
while ``lr mu <= 2``. An honest hospital exceeds the bound with probability at most ``p`` per round.
"""

from __future__ import annotations

import math

#: Per-round probability that an honest hospital's update exceeds the bound (and is rejected).
DEFAULT_FAILURE_PROBABILITY = 1e-9


def dp_sgd_update_bound(*, num_examples: int, batch_size: int, epochs: int, learning_rate: float,
                        max_grad_norm: float, noise_multiplier: float, parameters: int,
                        failure_probability: float = DEFAULT_FAILURE_PROBABILITY) -> float:
    """L2 distance that one round of local DP-SGD on `num_examples` examples exceeds with probability at most
    `failure_probability` (see the module doc for the derivation)."""
    if num_examples < 1 or batch_size < 1 or epochs < 1 or parameters < 0:
        raise ValueError("num_examples, batch_size and epochs must be >= 1, parameters >= 0")
    if not (learning_rate > 0 and max_grad_norm > 0 and noise_multiplier >= 0 and 0 < failure_probability < 1):
        raise ValueError("learning_rate and max_grad_norm must be > 0, noise_multiplier >= 0, "
                         "failure_probability in (0, 1)")
    per_epoch = math.ceil(num_examples / batch_size)
    steps = per_epoch * epochs
    expected_batch = max(1, int(num_examples * (1.0 / per_epoch)))  # as Opacus: int(len(dataset) * sample_rate)
    t = math.log(2.0 / failure_probability)
    mean_drawn = num_examples * epochs
    drawn = mean_drawn + math.sqrt(2.0 * mean_drawn * t) + 2.0 * t / 3.0
    noise = noise_multiplier * max_grad_norm * math.sqrt(steps) * (math.sqrt(parameters) + math.sqrt(2.0 * t))
    return learning_rate / expected_batch * (max_grad_norm * drawn + noise)
