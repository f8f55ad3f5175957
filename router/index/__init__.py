"""The sans-I/O KV index: chunk hashing, the prefix index, the bounded-load ring, MinHash similarity.

Rules for everything under this package: no asyncio, no sockets, no threads, and no clock —
whenever time matters it is an argument (`now`, in seconds on any monotonic scale).
"""

from router.index.chunking import ChunkHashes, hash_chat, hash_text, hash_tokens, render_chat
from router.index.prefix_index import PrefixIndex
from router.index.ring import BoundedLoadRing
from router.index.similarity import SimilarityIndex

__all__ = [
    "BoundedLoadRing",
    "ChunkHashes",
    "PrefixIndex",
    "SimilarityIndex",
    "hash_chat",
    "hash_text",
    "hash_tokens",
    "render_chat",
]
