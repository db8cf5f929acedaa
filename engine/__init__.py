"""moedesk's engine: everything that runs a model. Never imports Qt."""
import os

# Offline always: nothing in the engine may reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
