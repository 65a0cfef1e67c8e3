"""`from_preset` / `save_to_preset` for the backbone and the classifier."""


class _ClassProperty:
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


class PresetMixin:
    @_ClassProperty
    def presets(cls):
        """{name: metadata} of the built-in presets (keras-hub's
        `Backbone.presets`): description, kind, image size, evaluation
        pipeline (`preprocessing`), label set, parameters, FLOPs, ..."""
        from keras_e3.presets import builtin as registry

        return {name: registry.preset_metadata(name)
                for name in registry.list_presets()}

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Builds the model from a preset and loads its weights.

        `preset`: a built-in name (`keras_e3.list_presets()`), a local
        preset directory, or `hf://owner/repo[/revision]`. Keyword
        overrides: `num_classes` (classifier only: a fresh head),
        `image_size` (position embeddings resampled), `load_weights`,
        `dtype`, and weight-free settings such as `capacity_factor`; see
        `keras_e3.presets.loader`.
        """
        from keras_e3.presets.loader import from_preset

        return from_preset(cls, preset, **kwargs)

    @classmethod
    def abstract_from_preset(cls, preset, **kwargs):
        """The preset's architecture with shapes but no weight memory, to
        count the parameters and FLOPs of models too big to instantiate
        (see `keras_e3.presets.loader.abstract_model`)."""
        from keras_e3.presets.loader import abstract_model

        return abstract_model(cls, preset, **kwargs)

    def save_to_preset(self, preset_dir, preprocessor=None,
                       extra_metadata=None, extra_files=None,
                       max_shard_size=None):
        """Writes a preset directory (keras-hub's layout) atomically, with
        the sha256 of every file in metadata.json.

        Args:
            preset_dir: the directory to write.
            preprocessor: the `ImageConverter` saved as preprocessor.json
                (default: the model's `preprocessor`, else the default
                converter for the backbone's input shape).
            extra_metadata: more entries for metadata.json.
            extra_files: {file name: JSON content} written beside.
            max_shard_size: split the weights into shards of at most this
                size in GB (Keras' sharded weights format).
        """
        from keras_e3.presets.loader import save_to_preset

        return save_to_preset(self, preset_dir, preprocessor=preprocessor,
                              extra_metadata=extra_metadata,
                              extra_files=extra_files,
                              max_shard_size=max_shard_size)
