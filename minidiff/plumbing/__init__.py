"""Files, flags, progress, devices and precision, model loading and conversion."""
