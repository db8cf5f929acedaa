"""Building the default model and tuning routers."""
