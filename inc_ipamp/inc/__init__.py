"""INC integration. Importing this module registers the ``ip_empirical_time`` config and algorithm with INC 3.x.

INC's own API runs the whole method from its calibration hook (no frontier file needed)::

    import inc_ipamp.inc as ipamp_inc
    from neural_compressor.torch.quantization import autotune, TuningConfig
    q = autotune(model, TuningConfig(config_set=[ipamp_inc.IPEmpiricalTimeConfig()], tolerable_loss=0.01), eval_fn,
                 run_fn=calib_fn, example_inputs=(ids,))
    q = ipamp_inc.autotune(model, eval_fn, run_fn=calib_fn, tolerable_loss=0.01)   # same, eval_fn checked
    q = ipamp_inc.autotune(model, eval_fn, "out/frontier.json", example_inputs=ids)  # replay a CLI frontier

The INC 2.x API (``PostTrainingQuantConfig``) is ``inc_ipamp.inc2``, in an environment of its own. Applying a plan
outside a tuning loop (INC's CPU paths, FP8 on Gaudi) is ``inc_ipamp.apply``.
"""

from .method import MethodSettings, NoQuantizableOpsError, TuningSetupError, run_method
from .strategy import (
    ALGO,
    IPEmpiricalTimeConfig,
    IPEmpiricalTimeSampler,
    autotune,
    frontier_points,
    ip_empirical_time_entry,
    quantized_ops,
    tuning_config,
)

__all__ = ["ALGO", "IPEmpiricalTimeConfig", "IPEmpiricalTimeSampler", "MethodSettings", "NoQuantizableOpsError",
           "TuningSetupError", "autotune", "frontier_points", "ip_empirical_time_entry", "quantized_ops",
           "run_method", "tuning_config"]
