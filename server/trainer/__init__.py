"""Offline adapter trainer: one method per served kind, each declared by its module (server/trainer/methods.py),
written as PEFT (or AdapterHub, for bottleneck adapters) directories.

Entry points: `python -m server.trainer ...` and `python -m server train ...` (server/trainer/cli.py).
"""

from server.model.quant import quiet_bnb_kernel_probe

quiet_bnb_kernel_probe()  # before the trainer's modules import peft (and with it bitsandbytes)

# the modules that declare training methods (each registers its own; this order is the --method choices')
from server.trainer import peft_methods, bitfit, bottleneck, longlora  # noqa: E402, F401, I001
