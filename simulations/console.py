"""What third-party libraries print in the process that drives a simulation, each notice fixed at its cause or
filtered by its exact text (the hospitals' side is ``client.console``).

- Ray warns once per ``ray.init``, as a FutureWarning: "Tip: In future versions of Ray, Ray will no longer
  override accelerator visible devices env var if num_gpus=0 ...". Setting ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0``
  would silence it by changing what it announces: the virtual hospitals are declared 0-GPU
  (``simulations.run.CLIENT_RESOURCES``) and would then see, and use, every GPU of the machine behind Ray's back.
  The present behaviour (a 0-GPU actor sees no GPU) is the one wanted: the tip is filtered by its text, only from
  ``ray._private.worker``.
- Flower logs "DEPRECATED FEATURE: The `run_simulation` function is deprecated ..." at every in-process
  simulation. In-process simulation is what the tests, the demo and the notebook need (no ports, no background
  SuperLink; DESIGN §7): the record is filtered by its text on Flower's logger.
"""

from __future__ import annotations

import logging
import warnings

RAY_ACCELERATOR_TIP = (r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices "
                       r"env var if num_gpus=0")
RUN_SIMULATION_DEPRECATED = "DEPRECATED FEATURE: The `run_simulation` function is deprecated"


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RUN_SIMULATION_DEPRECATED)


_FLOWER_FILTER = _DropRunSimulationDeprecation()


def quiet_known_notices() -> None:
    """Install the driver-side filters (idempotent) and the hospitals' ones (``client.console``): the driver also
    runs hospital code (baselines, the held-out evaluation)."""
    from client.console import quiet_known_notices as quiet_hospital_notices

    quiet_hospital_notices()
    warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning,
                            module=r"ray\._private\.worker")
    logging.getLogger("flwr").addFilter(_FLOWER_FILTER)


__all__ = ["quiet_known_notices"]
