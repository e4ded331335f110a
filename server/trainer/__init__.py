"""Offline adapter trainer: LoRA, QLoRA, prompt tuning, P-tuning, prefix tuning and IA3, written as PEFT dirs.

Entry points: `python -m server.trainer ...` and `python -m server train ...` (server/trainer/cli.py).
"""

from server.model.quant import quiet_bnb_kernel_probe

quiet_bnb_kernel_probe()  # before the trainer's modules import peft (and with it bitsandbytes)
