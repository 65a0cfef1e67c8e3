"""The export's error."""


class ExportError(ValueError):
    """This model, backend and format cannot be exported (the message
    says why)."""
