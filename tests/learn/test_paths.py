"""learn/paths.py: ids generalize into Istio-expressible families, deterministically."""

from __future__ import annotations

import random

import pytest

from learn.paths import families, is_id_segment, is_wildcard, normalize_path, path_family


@pytest.mark.parametrize(("raw", "family"), [
    ("/reviews/0", "/reviews/*"),
    ("/details/12?format=json", "/details/*"),
    ("/productpage", "/productpage"),
    ("/productpage?u=normal", "/productpage"),
    ("/api/v1/users/550e8400-e29b-41d4-a716-446655440000/orders", "/api/v1/users/*"),
    ("/blobs/3f2a9c1e8b7d", "/blobs/*"),
    ("/t/eyJhbGciOiJIUzI1NiJ9eyJzdWIiOiIxIn0", "/t/*"),
    ("/reports/2024-05-01", "/reports/*"),
    ("/static/app.js", "/static/app.js"),
    ("/release-notes-for-version-two-final", "/release-notes-for-version-two-final"),
    ("/a/./b/../c", "/a/c"),
    ("/%61pi/x", "/api/x"),
    ("/12345", "/12345"),  # a root-level id never becomes '/*' (= any path)
    ("/files/a*b", "/files/*"),  # Istio would read '*' as a wildcard: generalize it
    ("/health#frag", "/health"),
])
def test_http_families(raw: str, family: str) -> None:
    assert path_family(raw, "http") == family


def test_templates_keep_the_rest_of_the_path_exact() -> None:
    p = "/api/v1/users/550e8400-e29b-41d4-a716-446655440000/orders/7"
    assert path_family(p, "http", templates=True) == "/api/v1/users/{*}/orders/{*}"
    assert path_family("/productpage", "http", templates=True) == "/productpage"
    assert path_family("/12345", "http", templates=True) == "/{*}"


def test_grpc_stays_exact() -> None:
    m = "/hipstershop.ProductCatalogService/GetProduct"
    assert path_family(m, "grpc") == m
    many = {f"/pkg.Svc{i}/Method": 1 for i in range(50)}
    assert families(many, "grpc", max_exact=3) == {p: p for p in many}


def test_id_classifier() -> None:
    assert is_id_segment("42") and is_id_segment("deadbeef01") and is_id_segment("2024-01-02")
    assert not is_id_segment("reviews") and not is_id_segment("deadbeef")
    assert not is_id_segment("")


def test_normalize_path_follows_istio_base() -> None:
    assert normalize_path("/a\\b/./c/../d?x=1") == "/a/b/d"
    assert normalize_path("/a//b") == "/a//b"  # merging slashes is MERGE_SLASHES, not BASE
    assert normalize_path("/a/b/..") == "/a/"


def test_many_siblings_collapse_but_never_to_root() -> None:
    names = {f"/files/report-{c}.pdf": 1 for c in "abcdefghijklmnopqrstuvwxy"}
    names["/files"] = 3
    names["/other"] = 1
    fam = families(names, "http", max_exact=20)
    assert {fam[p] for p in names if p.startswith("/files/")} == {"/files/*"}
    assert fam["/files"] == "/files" and fam["/other"] == "/other"
    # 21 distinct top-level paths: still exact, never '/*'
    top = {f"/page-{c}": 1 for c in "abcdefghijklmnopqrstu"}
    assert families(top, "http", max_exact=20) == {p: p for p in top}
    # at the threshold, nothing collapses
    few = {f"/files/report-{c}.pdf": 1 for c in "abcde"}
    assert families(few, "http", max_exact=5) == {p: p for p in few}
    assert set(families(few, "http", max_exact=4).values()) == {"/files/*"}


def test_collapse_with_templates_uses_double_star() -> None:
    paths = {f"/u/{i}/x{c}": 1 for i, c in enumerate("abcd")}
    fam = families(paths, "http", max_exact=3, templates=True)
    assert set(fam.values()) == {"/u/{*}/{**}"}


def test_families_are_order_independent() -> None:
    paths = {f"/a/b{i}": i for i in range(30)} | {"/reviews/1": 2, "/reviews/2?x": 1}
    items = list(paths.items())
    expected = families(dict(items), "http", max_exact=10)
    for seed in range(5):
        random.Random(seed).shuffle(items)
        assert families(dict(items), "http", max_exact=10) == expected
    assert expected["/reviews/2?x"] == "/reviews/*"


def test_is_wildcard() -> None:
    assert is_wildcard("/a/*") and is_wildcard("*/b") and is_wildcard("*")
    assert is_wildcard("/a/{*}/b") and not is_wildcard("/a/b")


def test_normalize_fast_path_agrees_with_the_full_normalization() -> None:
    import random

    from learn.paths import _normalize, normalize_path

    rng = random.Random(11)
    alphabet = ["/", ".", "..", "?", "#", "%2D", "%2f", "\\", "a", "b", "1", "-", "%"]
    for _ in range(20000):
        path = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 10)))
        assert normalize_path(path) == _normalize(path), path
