"""The root ``distillery`` command. It knows no stage: each stage contributes its commands
through the ``distillery.commands`` entry-point group (see ``pyproject.toml``), the way
``flask`` and ``datasette`` plugins do. Commands are thin: parse, call one function, print a
summary."""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points

import click

from distillery.engine.cli_errors import UserError, fail_cleanly

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The entry-point group through which stages add commands to ``distillery``.
COMMANDS_GROUP = "distillery.commands"


class StageGroup(click.Group):
    """The root group: its sub-commands are loaded from the ``distillery.commands`` entry points."""

    def _stage_commands(self) -> dict[str, click.Command]:
        if not hasattr(self, "_loaded"):
            self._loaded = {}
            for ep in entry_points(group=COMMANDS_GROUP):
                self._loaded[ep.name] = ep.load()
        return self._loaded

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._stage_commands()))

    def get_command(self, ctx, name):
        return super().get_command(ctx, name) or self._stage_commands().get(name)


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distillery")
def main() -> None:
    """Distillery: pseudo-label image pools with Grounding DINO + SAM teachers, curate,
    train a YOLOv8-seg student, export engines."""


@main.group("configs")
def configs() -> None:
    """The configs that ship with Distillery: teacher presets, ontologies, curation rules,
    device profiles. Options that take one (--teachers, --ontology, --rules,
    --device-profile) accept a shipped name or a path.

    \b
    Example:
      distillery configs list
      distillery configs show coco80 > my-ontology.yaml   # copy one, then edit it
    """


@configs.command("list")
def configs_list() -> None:
    """List shipped configs by kind, with the option that takes them."""
    from distillery.engine.config import CONFIG_KINDS, shipped_configs

    for kind, names in shipped_configs().items():
        _, what, option = CONFIG_KINDS[kind]
        click.echo(f"{what} ({option}): {', '.join(names) or 'none'}")


@configs.command("show")
@click.argument("name")
@click.option("--kind", type=click.Choice(["teachers", "ontology", "rules", "device-profile"]), default=None,
              help="Which kind, where a name is shipped for several (e.g. default).")
@fail_cleanly
def configs_show(name, kind) -> None:
    """Print the shipped config NAME (YAML), e.g. to copy and edit it.

    \b
    Example:
      distillery configs show jetson-orin-nx
      distillery configs show default --kind rules
    """
    from distillery.engine.config import shipped_configs

    found = [(k, names[name]) for k, names in shipped_configs(kind).items() if name in names]
    if not found:
        every = sorted({n for names in shipped_configs().values() for n in names})
        raise UserError(f"no shipped config named {name!r}{f' of kind {kind}' if kind else ''}; shipped: "
                        f"{', '.join(every)} (distillery configs list)")
    if len(found) > 1:
        raise UserError(f"{name!r} is shipped for several kinds ({', '.join(k for k, _ in found)}); "
                        "choose one with --kind")
    click.echo(found[0][1].read_text(encoding="utf-8"), nl=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
