"""Tenants' LoRA adapters: validation, object storage, registry, disk cache, fetcher.

Imports ``tenancy`` only. The gateway names a version's weights by content hash and object
key (the engine's ``AdapterRef``); the engine side fetches them with its own
:class:`adapters.fetcher.Fetcher`. The engine never sees a tenant or a database row.
"""
