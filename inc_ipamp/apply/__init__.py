"""Every way a plan is put on a model, in one place.

One protocol, the *applier*: ``applier(model, assignment)`` ({op name: format}) is a context manager that puts the
assignment on the model for the duration of a ``with`` block and yields the model to call; leaving the block
restores the model. ``evaluate.loss_change``, ``tasks.accuracy`` and the pipeline's evaluate stage take any
applier. The appliers:

* a device backend's ``apply`` (``gains.base.Backend.apply``): swaps each op for the very low-precision module that
  was timed (``kernels``: torch.ao dynamic INT8, ``torch._scaled_mm`` FP8, bf16 casts), what a user deploys;
* ``fake.fake_quant``: round-and-back with the same numerics (tests/test_numerics.py), for formats the machine has
  no kernel for (a Gaudi plan evaluated on a CPU); ``fake.fake_quant_kv`` rounds the K/V a low-precision KV cache
  would hold.

INC's ``quantize`` must instead *return* a quantized model, built once and kept (no restore). Those builders take
the plan and return the model to deploy, ``apply_<target>(model, plan, …) -> nn.Module``:

* ``cpu.apply_torchao_int8``: the plan's INT8 Linears swapped in place for the torch.ao kernels the ``cpu`` backend
  timed;
* ``cpu.apply_cpu``: INC's own CPU paths (PT2E dynamic INT8 graph, or FP8 Q/DQ), configured by ``export.cpu``;
* ``hpu.apply_hpu``: INC's FP8 MEASURE -> QUANTIZE passes on Gaudi, configured by ``export.fp8``.

Layering: this package sits above ``formats``/``ops``/``export`` (the plan -> INC config translations it runs) and
below ``gains`` (whose backends swap in ``kernels``), ``evaluate``, ``pipeline`` and ``inc``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import nn

#: puts an assignment on a model inside a ``with`` block and restores it on exit (see the module docstring)
Applier = Callable[[nn.Module, dict[str, str]], contextlib.AbstractContextManager[nn.Module]]

__all__ = ["Applier"]
