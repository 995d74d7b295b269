"""State stores of the gateway: per-key buckets, counters, concurrency slots and keys.

`MemoryStore` (embedded, default) and `RedisStore` (shared by many gateway instances) behave
the same; one table of test cases runs against both. Imports core, errors and settings;
never the client or the gateway.
"""

from unbroken.stores.base import Store
from unbroken.stores.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "open_store"]


def open_store(url: str) -> Store:
    """The store for a `store` setting: `memory`, or a `redis://` URL (needs the [redis]
    extra).

    Raises:
        ConfigError: the URL is not understood or redis is not installed.
    """
    if url == "memory":
        return MemoryStore()
    from unbroken.stores.redis import RedisStore

    return RedisStore.from_url(url)
