"""RFC 9162 (§2.1) Merkle tree hashing, kept incrementally.

A leaf is hashed as ``SHA-256(0x00 || data)`` and an interior node as ``SHA-256(0x01 || left ||
right)``; the tree over ``n`` leaves splits at the largest power of two below ``n``. The log never
holds the whole tree: a *frontier* — the roots of the perfect subtrees that the binary
decomposition of ``n`` gives, largest first — is enough to append a leaf in O(1) amortised and
to compute the root in O(log n). Folding the frontier right to left gives exactly the RFC's
root, because the RFC's split peels off those same perfect subtrees from the left.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class MerkleFrontier:
    """The roots of the perfect subtrees covering leaves ``0..size-1``, largest first."""

    def __init__(self, size: int = 0, nodes: Iterable[bytes] = ()) -> None:
        self.size = size
        self.nodes = list(nodes)
        if len(self.nodes) != size.bit_count():
            raise ValueError(f"a frontier of {size} leaves has {size.bit_count()} nodes")

    def append(self, leaf: bytes) -> None:
        """Add a leaf *hash*: merge equal-height subtrees like a binary counter's carries."""
        node, carries = leaf, self.size
        while carries & 1:
            node = node_hash(self.nodes.pop(), node)
            carries >>= 1
        self.nodes.append(node)
        self.size += 1

    def root(self) -> bytes:
        if not self.nodes:
            return EMPTY_ROOT
        root = self.nodes[-1]
        for node in reversed(self.nodes[:-1]):
            root = node_hash(node, root)
        return root

    def copy(self) -> MerkleFrontier:
        return MerkleFrontier(self.size, self.nodes)
