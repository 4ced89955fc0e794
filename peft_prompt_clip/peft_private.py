"""Every use this package makes of a private part of PEFT, each with why. PEFT offers no public way to add a method,
so these are the seams; check this one file against each new PEFT release (tested with peft 0.21.0 and 0.21.2)."""

from __future__ import annotations

from typing import Any

import torch
from peft import mapping
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn


def register_tuner(peft_type: str, config_cls: type, tuner_cls: type) -> None:
    """Make `get_peft_model`, `PeftModel.from_pretrained` and transformers' `load_adapter` know a PEFT type.

    `peft.register_peft_method` refuses names outside PEFT's own `PeftType` enum, but the mapping dicts it fills
    accept any (string-enum) key; filling them again is harmless.
    """
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner_cls.prefix


def set_active_adapter(layer: BaseTunerLayer, adapter_name: str) -> None:
    """Name a new layer's first adapter active. `BaseTunerLayer` keeps it in `_active_adapter`, and its public
    `set_adapter` also changes `requires_grad`, which the tuner decides for a new layer."""
    layer._active_adapter = adapter_name


class TunerPrivateHooks(BaseTuner):
    """The three private `BaseTuner` methods a prompt tuner overrides: a key rule of its own, and two forwarded to the
    tuner's own `check_loaded_state(model, config, adapter_name, state_dict, remapped)` and `unload_layers(merge)`.

    - `_remove_adapter_name_from_key`: PEFT's rule (the name ends the key, or comes before its last part, as in
      `lora_A.default.weight`) keeps the name in the keys of a module held per adapter whose tensors lie deeper
      (`prompt_embedding_coupling.default.0.weight`). transformers' loader inserts the name right after the part that
      starts with the tuner's prefix, whatever follows; PEFT's saving and loading both derive from this one rule, so
      removing the name there too makes the three agree.

    - `_remap_adapter_state_dict_for_load`: PEFT's only hook between reading an adapter's tensors and copying them
      into the model, where a foreign or damaged file must be refused before PEFT reports shapes in its own words.
    - `_unload_and_optionally_merge`: what `unload()` and `merge_and_unload()` call; a prompt layer is unwrapped,
      not merged.
    """

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        head, prefix, tail = key.partition(cls.prefix)
        store, _, rest = tail.partition(".")
        if not prefix or rest.partition(".")[0] != adapter_name:
            return super()._remove_adapter_name_from_key(key, adapter_name)
        return f"{head}{prefix}{store}{rest[len(adapter_name) :]}"

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        return cls.check_loaded_state(model, config, adapter_name, state_dict, remapped)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        return self.unload_layers(merge=merge)
