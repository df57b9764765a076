"""fercache: FER2013 emotion recognition on cached frozen CLIP embeddings.

Stage one (`extract`) encodes every face once into an HDF5 cache; stage two trains linear heads
on the cached arrays in seconds; stage three (`finetune`) tunes the encoder's top blocks from cached
tokens. The notebook API is `load_images`, `load_embeddings` and `load_tokens`.
"""

from fercache.cache import load_embeddings, load_tokens
from fercache.data import CLASSES, load_images
from fercache.errors import UserError

__all__ = ["CLASSES", "UserError", "load_embeddings", "load_images", "load_tokens"]
