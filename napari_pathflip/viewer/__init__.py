"""The thin napari layer: reader, sample data and the workspace widget. Everything here only calls the core."""
