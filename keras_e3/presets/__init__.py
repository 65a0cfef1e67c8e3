"""Presets: files and checksums (`files`), loading and saving (`loader`),
the built-in cards and the official-checkpoint cache (`builtin`), the
Hugging Face Hub (`hub`) and model cards (`model_card`).

Models reach this package only through their `from_preset` /
`save_to_preset` (`keras_e3.models.preset_mixin`); it builds models by
deserialising configs into the class it is given and never imports one.
"""

from keras_e3.presets.builtin import builtin_presets
from keras_e3.presets.builtin import list_presets
from keras_e3.presets.files import PresetError
from keras_e3.presets.hub import upload_preset
