"""sciq as binary classification (see configs/nlp.py for the presets)."""
from configs.nlp import get_nlp_config


def get_config(preset: str = "smoke"):
    return get_nlp_config("sciq", preset)
