"""Offline adapter trainer: one method per served kind (server/trainer/methods.py lists them), written as PEFT
(or AdapterHub, for bottleneck adapters) directories.

Entry points: `python -m server.trainer ...` and `python -m server train ...` (server/trainer/cli.py).
"""

from server.model.quant import quiet_bnb_kernel_probe

quiet_bnb_kernel_probe()  # before the trainer's modules import peft (and with it bitsandbytes)
