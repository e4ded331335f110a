"""Offline adapter trainer: LoRA, QLoRA, prompt tuning, P-tuning, prefix tuning and IA3, written as PEFT dirs.

Entry points: `python -m server.trainer ...` and `python -m server train ...` (server/trainer/cli.py).
"""
