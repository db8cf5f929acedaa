"""Where the project's own files live (standard library only: the GUI imports it too)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The default model trained by `python -m engine train-default` and shipped in the repository.
BUNDLED_MODEL = ROOT / "assets" / "models" / "moedesk-mini"
