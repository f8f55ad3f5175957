"""A multi-tenant radix tree over prompt characters, as SGLang's cache_aware router keeps one per model.

Rules (anchors.md, "SGLang router, cache_aware"):
- Edges are labelled with strings; each node knows which tenants (replicas) hold the prefix ending at
  it and when each last inserted through it. A tenant on a node is on all its ancestors, because
  `insert` marks the whole path and eviction removes leaves first.
- `tenant_size(t)` is the number of characters on nodes held by t — what "the smallest tree" and
  `max_size` measure. Splitting an edge does not change any tenant's size.
- `match` follows the text down nodes held by an allowed tenant and returns the characters matched
  (a partial edge counts) with the first allowed tenant of the deepest node reached: SGLang's "first
  holder", with no load tie-break.
- `evict(max_size)` removes, for every tenant above `max_size` characters, its least recently touched
  leaves until it fits; nodes no tenant holds are unlinked. SGLang runs this every
  `eviction_interval` (the caller decides when): in between, the tree grows without bound.
Pure Python and sans-I/O; time is the `now` argument.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Iterator


class _Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.tenants: dict[str, float] = {}  # tenant -> last insert time; insertion-ordered


def _common_length(edge: str, text: str, start: int) -> int:
    """Length of the common prefix of `edge` and `text[start:]` (C-speed slices, binary search)."""
    m = min(len(edge), len(text) - start)
    if text.startswith(edge[:m], start):
        return m
    lo, hi = 0, m - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class CharTree:
    """Prompt characters -> tenants holding them, with per-tenant sizes and LRU leaf eviction."""

    def __init__(self) -> None:
        self._root = _Node("", None)
        self._sizes: dict[str, int] = {}

    def insert(self, text: str, tenant: str, now: float) -> None:
        """Record that `tenant` received `text` (its whole path is refreshed to `now`)."""
        node = self._root
        node.tenants[tenant] = now
        self._sizes.setdefault(tenant, 0)
        i, n = 0, len(text)
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], node)
                leaf.tenants[tenant] = now
                node.children[text[i]] = leaf
                self._sizes[tenant] += n - i
                return
            k = _common_length(child.text, text, i)
            if k < len(child.text):
                child = self._split(child, k)
            if tenant not in child.tenants:
                self._sizes[tenant] += len(child.text)
            child.tenants[tenant] = now
            node = child
            i += k

    @staticmethod
    def _split(child: _Node, k: int) -> _Node:
        parent = child.parent
        assert parent is not None
        mid = _Node(child.text[:k], parent)
        mid.tenants = dict(child.tenants)
        child.text = child.text[k:]
        child.parent = mid
        mid.children[child.text[0]] = child
        parent.children[mid.text[0]] = mid
        return mid

    def match(self, text: str, allowed: Collection[str] | None = None) -> tuple[int, str | None]:
        """(characters matched, first allowed tenant at the deepest matched node), or (0, None)."""
        node = self._root
        i, n = 0, len(text)
        holder: str | None = None
        while i < n:
            child = node.children.get(text[i])
            if child is None:
                break
            tenant = next((t for t in child.tenants if allowed is None or t in allowed), None)
            if tenant is None:
                break
            k = _common_length(child.text, text, i)
            i += k
            holder = tenant
            if k < len(child.text):
                break
            node = child
        return (i, holder) if holder is not None else (0, None)

    def matched_chars(self, text: str, tenant: str) -> int:
        return self.match(text, (tenant,))[0]

    def tenant_size(self, tenant: str) -> int:
        return self._sizes.get(tenant, 0)

    def smallest_tenant(self, tenants: Iterable[str]) -> str:
        """The tenant holding the fewest characters (ties by name); ValueError if none given."""
        return min(tenants, key=lambda t: (self._sizes.get(t, 0), t))

    def _nodes(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def node_count(self) -> int:
        return sum(1 for _ in self._nodes())

    def evict(self, max_size: int) -> int:
        """Drop least recently touched leaves of every tenant above `max_size`; returns chars dropped."""
        over = {t for t, size in self._sizes.items() if size > max_size}
        if not over:
            return 0
        heaps: dict[str, list[tuple[float, int, _Node]]] = {t: [] for t in over}
        for node in self._nodes():
            for t in node.tenants.keys() & over:
                if not any(t in c.tenants for c in node.children.values()):
                    heaps[t].append((node.tenants[t], id(node), node))
        dropped = 0
        for tenant, heap in heaps.items():
            heapq.heapify(heap)
            while heap and self._sizes[tenant] > max_size:
                _, _, node = heapq.heappop(heap)
                dropped += self._drop(node, tenant)
                parent = node.parent
                if (
                    parent is not None
                    and parent is not self._root
                    and tenant in parent.tenants
                    and not any(tenant in c.tenants for c in parent.children.values())
                ):
                    heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))
        return dropped

    def _drop(self, node: _Node, tenant: str) -> int:
        """Remove `tenant` from `node`, unlinking the node if nobody holds it any more."""
        del node.tenants[tenant]
        self._sizes[tenant] -= len(node.text)
        if not node.tenants and not node.children and node.parent is not None:
            del node.parent.children[node.text[0]]
        return len(node.text)

    def remove_tenant(self, tenant: str) -> None:
        """Forget a tenant everywhere (its replica left), unlinking nodes nobody holds."""
        if self._sizes.pop(tenant, None) is None:
            return
        self._root.tenants.pop(tenant, None)
        # Children before parents, so a node emptied by this is already childless when visited.
        for node in reversed(list(self._nodes())):
            if node.tenants.pop(tenant, None) is not None and not node.tenants and not node.children:
                assert node.parent is not None
                del node.parent.children[node.text[0]]
