"""SGLang-style character radix tree: matches equal brute force; sizes and eviction keep their rules."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from router.policies.char_tree import CharTree

TENANTS = ("a", "b", "c")
texts = st.text(alphabet="xyz", min_size=0, max_size=12)
inserts = st.lists(st.tuples(st.sampled_from(TENANTS), texts), max_size=25)


def lcp(x: str, y: str) -> int:
    return next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))


def prefixes(strings: list[str]) -> set[str]:
    return {s[:i] for s in strings for i in range(1, len(s) + 1)}


def check_invariants(tree: CharTree) -> None:
    """Sizes equal the characters on a tenant's nodes; a tenant on a node is on its parent too."""
    sizes: dict[str, int] = {}
    for node in tree._nodes():
        for t in node.tenants:
            sizes[t] = sizes.get(t, 0) + len(node.text)
            parent = node.parent
            assert parent is not None and t in parent.tenants
        assert node.tenants, "a node nobody holds must be unlinked"
    for t in TENANTS:
        assert tree.tenant_size(t) == sizes.get(t, 0)


@settings(max_examples=200, deadline=None)
@given(inserts, texts)
def test_match_and_sizes_equal_brute_force(ops: list[tuple[str, str]], query: str) -> None:
    tree = CharTree()
    held: dict[str, list[str]] = {t: [] for t in TENANTS}
    for now, (tenant, text) in enumerate(ops):
        tree.insert(text, tenant, float(now))
        held[tenant].append(text)
    check_invariants(tree)
    for t in TENANTS:
        # An uncompressed trie has one node per distinct prefix: the size in characters.
        assert tree.tenant_size(t) == len(prefixes(held[t]))
        assert tree.matched_chars(query, t) == max((lcp(query, s) for s in held[t]), default=0)
    best = max((lcp(query, s) for ss in held.values() for s in ss), default=0)
    matched, holder = tree.match(query)
    assert matched == best
    if best:
        assert holder is not None and tree.matched_chars(query, holder) == best
    else:
        assert holder is None


@settings(max_examples=150, deadline=None)
@given(inserts, st.integers(min_value=0, max_value=20))
def test_eviction_bounds_every_tenant_and_keeps_the_tree_consistent(
    ops: list[tuple[str, str]], max_size: int
) -> None:
    tree = CharTree()
    for now, (tenant, text) in enumerate(ops):
        tree.insert(text, tenant, float(now))
    before = {t: tree.tenant_size(t) for t in TENANTS}
    dropped = tree.evict(max_size)
    check_invariants(tree)
    after = {t: tree.tenant_size(t) for t in TENANTS}
    assert all(after[t] <= max(max_size, 0) or after[t] == before[t] <= max_size for t in TENANTS)
    assert dropped == sum(before.values()) - sum(after.values())


def test_eviction_removes_least_recently_inserted_leaves_first() -> None:
    tree = CharTree()
    tree.insert("shared-old", "a", 1.0)
    tree.insert("shared-new", "a", 2.0)
    tree.insert("shared-old", "b", 3.0)  # b's touch does not refresh a's copy
    assert tree.tenant_size("a") == len("shared-") + 3 + 3
    tree.evict(len("shared-new"))
    assert tree.matched_chars("shared-new", "a") == len("shared-new")
    assert tree.matched_chars("shared-old", "a") == len("shared-")
    assert tree.matched_chars("shared-old", "b") == len("shared-old")


def test_first_holder_at_the_deepest_node_and_allowed_filter() -> None:
    tree = CharTree()
    stem = "system prompt: be brief. question "
    tree.insert(stem + "one", "b", 1.0)
    tree.insert(stem + "two", "a", 2.0)
    tree.insert("system prompt", "c", 3.0)
    assert tree.match(stem + "two!") == (len(stem + "two"), "a")
    # Among the holders of the deepest shared node, the first to arrive: b before a.
    assert tree.match(stem + "x") == (len(stem), "b")
    # A partial edge counts: "question t" reaches into a's "two".
    assert tree.match(stem + "three") == (len(stem + "t"), "a")
    assert tree.match("system prompt: be brief.", allowed={"c"}) == (len("system prompt"), "c")
    assert tree.smallest_tenant(["a", "b", "c", "d"]) == "d"


def test_remove_tenant_unlinks_nodes_only_it_held() -> None:
    tree = CharTree()
    tree.insert("abcdef", "a", 1.0)
    tree.insert("abcxyz", "b", 1.0)
    tree.remove_tenant("a")
    check_invariants(tree)
    assert tree.match("abcdef") == (3, "b")
    assert tree.node_count() == 2  # "abc" and "xyz"; "def" is gone
