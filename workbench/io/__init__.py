"""Bottom layer: cache paths, atomic writes and locks, provenance, figure and table saving, manifests, gallery."""
