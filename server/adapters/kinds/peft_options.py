"""PEFT's config options that change the math, with the value that means "off" (tensor keys: peft_keys.py).

PEFT's vocabulary, not a list of kinds: a kind that serves one of these options reads it in its own module and
hands the rest of the config on with the option off (DoRA: use_dora, dora.py; LongLoRA: modules_to_save,
longlora.py), so a new kind never edits this list."""

from __future__ import annotations

from server.adapters.kinds.base import AdapterFormatError

# options we do not serve, with the value that means "off"
_UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
                "alpha_pattern": {}, "layer_replication": None, "trainable_token_indices": None}


def check_served_options(cfg: dict) -> None:
    """Refuse the PEFT options that change the math in ways we do not serve."""
    for option, off in _UNSUPPORTED.items():
        if cfg.get(option) not in (off, None) and cfg.get(option) != off:
            raise AdapterFormatError(f"{option}={cfg[option]!r} is not served")
    if cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"bias={cfg['bias']!r} is not served (only 'none')")
