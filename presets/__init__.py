"""Built-in preset cards (JSON) and the small presets shipped beside them,
installed as the package data of `keras_e3.presets.builtin_cards`; read by
`keras_e3.presets.builtin`."""
