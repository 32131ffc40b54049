"""Plain-Python foundations every layer may import: configs and settings (the one source of defaults), limits,
errors, the metric registry, file helpers."""
