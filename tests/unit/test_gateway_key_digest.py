"""The per-request key digest is exactly the stored form of a key (`hash_key`)."""

from __future__ import annotations

import hashlib

import pytest

from unbroken.gateway.keys import key_digest
from unbroken.settings import hash_key


@pytest.mark.parametrize("key", ["sk-bench-gateway-key", "", "ключ-🔑-鍵", "x" * 10_000])
def test_the_digest_is_the_stored_form(key: str) -> None:
    assert key_digest(key) == hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
