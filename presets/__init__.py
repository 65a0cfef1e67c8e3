"""Preset cards (JSON), installed as the `keras_e3.preset_cards` package;
read by `keras_e3.registry`."""
