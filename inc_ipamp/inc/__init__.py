"""INC integration. Importing this module registers the ``ip_empirical_time`` config and algorithm with INC 3.x.

Use either our one-call wrapper or INC's own API::

    import inc_ipamp.inc as ipamp_inc
    q = ipamp_inc.autotune(model, eval_fn, "out/frontier.json", example_inputs=ids, tolerable_loss=0.01)

    from neural_compressor.torch.quantization import autotune
    q = autotune(model, ipamp_inc.tuning_config("out/frontier.json", tolerable_loss=0.01), eval_fn,
                 example_inputs=ids)
"""

from .hpu import GaudiUnavailableError, apply_hpu, require_gaudi
from .strategy import (
    ALGO,
    IPEmpiricalTimeConfig,
    IPEmpiricalTimeSampler,
    TuningSetupError,
    autotune,
    frontier_points,
    ip_empirical_time_entry,
    tuning_config,
)

__all__ = ["ALGO", "GaudiUnavailableError", "IPEmpiricalTimeConfig", "IPEmpiricalTimeSampler", "TuningSetupError",
           "apply_hpu", "autotune", "frontier_points", "ip_empirical_time_entry", "require_gaudi", "tuning_config"]
