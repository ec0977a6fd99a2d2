"""The checks a BEiT run's tokenizer setting gets before any process starts: no torch here, so the SLURM launcher runs
them on a login node."""

from __future__ import annotations

import os
from pathlib import Path

DALLE_ENCODER_URL = "https://cdn.openai.com/dall-e/encoder.pkl"

_HOW_TO_GET_WEIGHTS = (
    "A BEiT run needs the DALL-E dVAE encoder weights as its target tokenizer. Download OpenAI's public file "
    f"encoder.pkl from the DALL-E release ({DALLE_ENCODER_URL}), or a state dict converted from it "
    "(.pt/.pth/.safetensors), and put its path in the config key `target.tokenizer_path`. The original encoder.pkl "
    "is a pickled module, so loading it also needs `target.trust_pickle: true`."
)


class TokenizerWeightsError(ValueError):
    """The tokenizer's weights are missing, refused, or not those of a DALL-E dVAE encoder."""


def check_tokenizer_file(path: str | os.PathLike | None, trust_pickle: bool = False) -> Path:
    """The checks that need no unpickling: given, present, a known format, and trusted if it is a pickle; so a run
    can refuse a bad tokenizer setting before it starts any process."""
    if path is None or str(path) == "":
        raise TokenizerWeightsError(
            f"No tokenizer weights given (target.tokenizer_path is empty). {_HOW_TO_GET_WEIGHTS}"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise TokenizerWeightsError(f"Tokenizer weights file not found: {path}. {_HOW_TO_GET_WEIGHTS}")
    if path.suffix.lower() == ".pkl" and not trust_pickle:
        raise TokenizerWeightsError(
            f"{path} is a pickle (like OpenAI's encoder.pkl, a whole pickled module). Unpickling runs code from "
            "the file, so it is refused by default. If you trust the file, set `target.trust_pickle: true` "
            "(load_dalle_encoder(..., trust_pickle=True)), or convert it once to a .safetensors/.pt state dict."
        )
    if path.suffix.lower() not in (".pkl", ".pt", ".pth", ".bin", ".safetensors"):
        raise TokenizerWeightsError(
            f"{path}: unsupported weights format {path.suffix or '(no extension)'!r}; use .pkl (OpenAI's encoder.pkl), "
            ".pt/.pth or .safetensors."
        )
    return path
