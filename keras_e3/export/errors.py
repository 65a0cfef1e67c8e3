"""The export's error."""


class ExportError(ValueError):
    """This model, backend and format cannot be exported (the message
    says why).

    Example:
    ```python
    from keras_e3 import export

    try:
        export.format_from_path("model.onnx", format="litert")
    except export.ExportError as error:
        print(error)
    ```
    """
