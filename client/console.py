"""What third-party libraries print in a hospital's processes (ClientApp, simulation actor, local training).

Each notice is handled at its cause where the project can act on it, else filtered by its exact text; nothing is
silenced by category or by library as a whole.

- Flower logs through its own console handler at INFO, and its logger is at DEBUG. Opacus calls
  ``logging.basicConfig`` when imported, which gives the root logger a handler too: every Flower record then
  printed twice, and its DEBUG records (the SecAgg+ mod's stage-by-stage lines) reached the console through the
  root handler. Cause fixed: Flower's logger does not propagate (Flower's own ``run_simulation`` does the same).
- Flower's simulation actors log "Manually terminating ClientAppActor" at WARNING when a simulation ends
  normally: filtered by that text.
- Opacus warns "Secure RNG turned off" whenever ``secure_mode`` is False. The choice is made knowingly
  (``common.training_config.DPConfig.secure_mode``: noise and sampling come from seeded torch generators; the
  secure mode needs ``torchcsprng``, which has no build for the pinned torch): filtered by its text, and only
  from ``opacus.privacy_engine``.
- torch warns "Full backward hook is firing when gradients are computed with respect to module outputs since no
  inputs require gradients" when Opacus' per-sample hooks run on the first trainable layer, whose input never
  needs a gradient (images, or frozen features). Opacus needs only the output gradient there; making inputs
  require gradients would cost a backward pass through them for nothing: filtered by its text, only when raised
  from the training loop (``client.training``).

:func:`quiet_known_notices` installs all of it; it is idempotent and cheap. It runs when ``client.app`` is imported
(simulation actors import it to run the ClientApp, so they are covered too) and before each DP training round
(``client.training``: also the baselines' training, and a test harness may reset warning filters in between).
"""

from __future__ import annotations

import logging
import warnings

FLOWER_LOGGER = "flwr"
ACTOR_SHUTDOWN = "Manually terminating ClientAppActor"
SECURE_RNG_OFF = r"Secure RNG turned off\."
HOOK_WITHOUT_INPUT_GRADIENT = (r"Full backward hook is firing when gradients are computed with respect to module "
                               r"outputs since no inputs require gradients\.")


class _DropMessage(logging.Filter):
    """Drops records whose formatted message is exactly one known text."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.text


_ACTOR_SHUTDOWN_FILTER = _DropMessage(ACTOR_SHUTDOWN)


def quiet_known_notices() -> None:
    """Install the fixes and filters described in the module doc (idempotent)."""
    flower = logging.getLogger(FLOWER_LOGGER)
    flower.propagate = False
    flower.addFilter(_ACTOR_SHUTDOWN_FILTER)  # a no-op when already there
    # filterwarnings replaces an identical filter instead of adding a second one
    warnings.filterwarnings("ignore", message=SECURE_RNG_OFF, category=UserWarning, module=r"opacus\.privacy_engine")
    warnings.filterwarnings("ignore", message=HOOK_WITHOUT_INPUT_GRADIENT, category=UserWarning,
                            module=r"client\.training")


__all__ = ["quiet_known_notices"]
