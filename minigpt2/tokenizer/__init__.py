"""GPT-2's tokenizer: byte-level BPE on tiktoken, with the ids transformers 5 gives.

The folder, one concept per file:

* ``tokenizer.py``: :class:`Tokenizer`, the public class (encode / decode / the batch call /
  offsets / save);
* ``bytelevel.py``: the byte-level alphabet and the BPE engine on tiktoken, linear on long runs;
* ``added_tokens.py``: :class:`AddedToken` and the matching of added tokens in the raw text;
* ``files.py``: a checkpoint's tokenizer files (tokenizer.json, vocab.json + merges.txt,
  tokenizer_config.json, ...) read as transformers 5 reads them, and written back;
* ``batch.py``: truncation, padding and :class:`BatchEncoding` for the batch call.

Typical use::

    tok = Tokenizer()                                   # GPT-2's own, shipped with minigpt2
    tok.encode("Hello world")                           # [15496, 995]
    tok.decode([15496, 995])                            # "Hello world"
    tok = Tokenizer.from_pretrained("path/or/hub-id")   # any byte-level BPE fine-tune
    enc = tok(["a prompt", "another, longer prompt"], padding=True, padding_side="left", return_tensors="pt")
"""

from .added_tokens import AddedToken
from .batch import BatchEncoding
from .bytelevel import GPT2_PATTERN
from .tokenizer import DEFAULT_EOS_TOKEN, Tokenizer

__all__ = ["AddedToken", "BatchEncoding", "DEFAULT_EOS_TOKEN", "GPT2_PATTERN", "Tokenizer"]
