"""minigpt2: GPT-2 from scratch in plain PyTorch, matching transformers token for token.

    >>> import minigpt2
    >>> model = minigpt2.GPT2.from_pretrained("gpt2")
    >>> tok = minigpt2.Tokenizer.from_pretrained("gpt2")
    >>> logits = model(torch.tensor([tok.encode("Hello, world")]))
"""

from .cache import KVCache
from .config import PRESETS, GPT2Config
from .generation import GenerateOutput, StreamStep, generate, stream
from .generation_config import GenerationConfig
from .internals import ActivationCache, LogitLens, ScoreResult, logit_lens, score
from .loading import get_device
from .model import GPT2
from .tokenizer import Tokenizer
from .training import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "GPT2", "GPT2Config", "KVCache", "PRESETS", "Tokenizer", "get_device", "__version__",
    "ActivationCache", "LogitLens", "ScoreResult", "logit_lens", "score",
    "GenerateOutput", "GenerationConfig", "StreamStep", "generate", "stream",
    "TrainConfig", "TrainResult", "train",
]
