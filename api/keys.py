"""`flask --app api keys create|list|revoke`: API key administration for operators."""
from __future__ import annotations

import click
from flask.cli import AppGroup

from jobs import repository
from jobs.errors import InvalidInput

from .context import unit_of_work

keys = AppGroup("keys", help="Create, list and revoke API keys.")


@keys.command("create")
@click.option("--owner", required=True, help="Who the key belongs to; their files, jobs and models are theirs alone.")
def create(owner: str) -> None:
    """Create a key. The secret is printed once, as the last line; only its hash is stored."""
    try:
        with unit_of_work() as session:
            key, secret = repository.create_api_key(session, owner)
    except InvalidInput as exc:
        raise click.BadParameter(exc.message, param_hint="--owner") from None
    click.echo(f"created {key.id} for owner {owner!r}; store the key now, it is not shown again:")
    click.echo(secret)


@keys.command("list")
@click.option("--owner", required=True)
def list_keys(owner: str) -> None:
    """List an owner's keys (ids and prefixes, never secrets)."""
    with unit_of_work() as session:
        for key in repository.list_api_keys(session, owner):
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            click.echo(f"{key.id}  {key.prefix}...  created {key.created_at:%Y-%m-%d %H:%M}  {state}")


@keys.command("revoke")
@click.option("--owner", required=True)
@click.argument("key_id")
def revoke(owner: str, key_id: str) -> None:
    """Revoke a key at once: requests with it get 401."""
    with unit_of_work() as session:
        repository.revoke_api_key(session, owner, key_id)
    click.echo(f"revoked {key_id}")
