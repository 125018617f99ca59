"""`loraplex admin ...`: operator commands (tenants, keys). Filled in by the gateway work."""

from __future__ import annotations

import typer

app = typer.Typer(help="Operate tenants and API keys.", no_args_is_help=True)
