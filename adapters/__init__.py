"""Tenants' LoRA adapters: validation, object storage, registry, disk cache, fetcher.

Imports ``tenancy`` only. The gateway turns an :class:`adapters.fetcher.AdapterSource`
into the engine's ``AdapterRef``; the engine never sees a tenant or a database row.
"""
