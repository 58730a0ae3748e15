"""Known third-party console notices are handled narrowly: each by its exact text (and origin), nothing else with it.

The end-to-end checks (no noise in a real simulation's output, driver and Ray actors) are in test_sim_cli and
test_secure_aggregation; these check that the filters are no wider than they should be.
"""

from __future__ import annotations

import logging
import warnings

from flwr.supercore.logger import FLOWER_LOGGER, warn_deprecated_feature

from simulations.console import quiet_known_notices

SECURE_RNG = ("Secure RNG turned off. This is perfectly fine for experimentation as it allows for much faster training "
              "performance, but remember to turn it on and retrain one last time before production with "
              "``secure_mode`` turned on.")
HOOK = ("Full backward hook is firing when gradients are computed with respect to module outputs since no inputs "
        "require gradients. See https://docs.pytorch.org/docs/main/generated/torch.nn.Module.html"
        "#torch.nn.Module.register_full_backward_hook for more details.")
RAY_TIP = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if "
           "num_gpus=0 or num_gpus=None (default). To enable this behavior and turn off this error message, set "
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0")


def test_warnings_are_filtered_by_exact_text_and_origin_only():
    emitted = [(SECURE_RNG, UserWarning, "opacus.privacy_engine"),  # filtered
               (SECURE_RNG, UserWarning, "opacus.optimizers.optimizer"),  # same text, elsewhere: shown
               ("Secure RNG is on", UserWarning, "opacus.privacy_engine"),  # other text: shown
               (HOOK, UserWarning, "client.training"),  # filtered
               (HOOK, UserWarning, "bench.fedsgd"),  # shown
               (RAY_TIP, FutureWarning, "ray._private.worker"),  # filtered
               (RAY_TIP, UserWarning, "ray._private.worker"),  # other category: shown
               ("Tip: something else", FutureWarning, "ray._private.worker")]  # shown
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_notices()
        for text, category, module in emitted:
            warnings.warn_explicit(text, category, f"{module}.py", 1, module=module)
    shown = [(str(w.message), w.category, w.filename[:-3]) for w in caught]
    assert shown == [emitted[i] for i in (1, 2, 4, 6, 7)]


def test_flower_prints_through_its_own_handler_without_the_two_known_notices():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    quiet_known_notices()
    FLOWER_LOGGER.addHandler(handler)
    try:
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed in a future "
                                "version of Flower.")  # Flower's own call: filtered
        warn_deprecated_feature("Passing `enable_tf_gpu_growth=True` is deprecated.")  # another one: kept
        FLOWER_LOGGER.warning("Manually terminating %s", "ClientAppActor")  # filtered
        FLOWER_LOGGER.warning("Manually terminating %s", "ServerAppActor")  # kept
        FLOWER_LOGGER.info("Secure aggregation completed.")  # kept
    finally:
        FLOWER_LOGGER.removeHandler(handler)
    assert [r.getMessage().splitlines()[0] for r in records] == [
        "DEPRECATED FEATURE: Passing `enable_tf_gpu_growth=True` is deprecated.",
        "Manually terminating ServerAppActor", "Secure aggregation completed."]
    assert FLOWER_LOGGER.propagate is False  # a root handler (Opacus' basicConfig) never doubles or adds DEBUG
