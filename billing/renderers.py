"""CSV for billing's reports: the renderer is shared with the catalog's (publishers' exports)."""

from controlplane.rest.renderers import CSVRenderer

__all__ = ["CSVRenderer"]
