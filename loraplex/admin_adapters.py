"""`loraplex admin adapter ...`: upload (with a progress bar), list, show, alias, delete.

The upload streams a multipart body from disk with an exact Content-Length, so a server
cap answers 413 before the bytes are sent and nothing is held whole in memory.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from loraplex.admin_cli import Remote, _show, err, exit_on_error

adapter_app = typer.Typer(
    help="A tenant's LoRA adapters: upload, list, show, alias, delete.", no_args_is_help=True
)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_COLUMNS = ["name", "current_version", "aliases", "created_at"]
VERSION_COLUMNS = ["name", "version", "sha256", "rank", "target_modules", "bytes"]
CHUNK = 1 << 20


def _files(paths: list[Path]) -> list[Path]:
    """A PEFT directory -> its two files; an archive or the two files as given."""
    if len(paths) == 1 and paths[0].is_dir():
        found = [paths[0] / name for name in PEFT_FILES]
        missing = [p.name for p in found if not p.is_file()]
        if missing:
            raise typer.BadParameter(f"{paths[0]} has no {', '.join(missing)}")
        return found
    for p in paths:
        if not p.is_file():
            raise typer.BadParameter(f"{p} is not a file")
    return paths


def _multipart(name: str, files: list[Path], boundary: str) -> tuple[list[bytes | Path], int]:
    parts: list[bytes | Path] = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode()
    ]
    for path in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        )
        parts.append(path)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    size = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in parts)
    return parts, size


def _stream(parts: list[bytes | Path], progress: Progress, task: Any) -> Iterator[bytes]:
    for part in parts:
        if isinstance(part, bytes):
            progress.advance(task, len(part))
            yield part
            continue
        with part.open("rb") as f:
            while chunk := f.read(CHUNK):
                progress.advance(task, len(chunk))
                yield chunk


@adapter_app.command("upload")
def upload(
    ctx: typer.Context,
    tenant: str,
    name: str,
    paths: Annotated[
        list[Path], typer.Argument(help="A PEFT dir, its two files, or one .tar.gz/.zip.")
    ],
) -> None:
    """Upload a new version of adapter NAME for TENANT."""
    remote: Remote = ctx.obj
    files = _files(paths)
    boundary = f"lpx-{uuid.uuid4().hex}"
    parts, size = _multipart(name, files, boundary)
    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(size),
    }
    if remote.token:
        headers["Authorization"] = f"Bearer {remote.token}"
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=err, transient=remote.as_json) as progress:
            task = progress.add_task(f"{tenant}/{name}", total=size)
            with httpx.Client(base_url=remote.url, timeout=httpx.Timeout(60.0, write=600.0)) as c:
                response = c.post(
                    f"/admin/v1/tenants/{tenant}/adapters",
                    content=_stream(parts, progress, task),
                    headers=headers,
                )
    except httpx.HTTPError as exc:
        err.print(f"[red]upload failed: {exc}[/red]")
        raise typer.Exit(2) from None
    exit_on_error(response)
    _show(remote, response.json(), VERSION_COLUMNS, "adapter version")


@adapter_app.command("list")
def list_adapters(ctx: typer.Context, tenant: str) -> None:
    remote: Remote = ctx.obj
    data = remote.call("GET", f"/admin/v1/tenants/{tenant}/adapters")
    _show(remote, data, ADAPTER_COLUMNS, f"adapters of {tenant}")


@adapter_app.command("show")
def show(ctx: typer.Context, tenant: str, name: str) -> None:
    remote: Remote = ctx.obj
    data = remote.call("GET", f"/admin/v1/tenants/{tenant}/adapters/{name}")
    if remote.as_json:
        _show(remote, data, [], "")
        return
    _show(remote, {"data": data["versions"]}, VERSION_COLUMNS, f"{name} (aliases: "
          f"{data['aliases'] or 'none'})")  # fmt: skip


@adapter_app.command("alias")
def alias(ctx: typer.Context, tenant: str, name: str, alias: str, version: int) -> None:
    """Point ALIAS at NAME@VERSION (new requests only; in-flight ones finish on theirs)."""
    remote: Remote = ctx.obj
    data = remote.call(
        "PUT", f"/admin/v1/tenants/{tenant}/adapters/{name}/aliases/{alias}", {"version": version}
    )
    _show(remote, data, ["alias", "name", "version"], "alias")


@adapter_app.command("delete")
def delete(ctx: typer.Context, tenant: str, name: str) -> None:
    """Delete NAME: it stops resolving at once; its bytes go at the next GC."""
    remote: Remote = ctx.obj
    _show(remote, remote.call("DELETE", f"/admin/v1/tenants/{tenant}/adapters/{name}"),
          ["name", "deleted"], "deleted")  # fmt: skip


@adapter_app.command("gc")
def gc(
    ctx: typer.Context,
    grace_s: Annotated[
        float, typer.Option(help="Spare objects younger than this (uploads in flight).")
    ] = 3600.0,
) -> None:
    """Delete stored adapter bytes that no live version uses (deleted or orphaned)."""
    remote: Remote = ctx.obj
    data = remote.call("POST", "/admin/v1/adapters/gc", {"grace_s": grace_s})
    _show(remote, data, ["deleted_objects", "deleted_bytes", "aborted_uploads"], "adapter GC")
