"""Generate the recipe reference (docs/recipe.md) from the pydantic models.

Run `python -m fae_cli.recipe_docs > docs/recipe.md`; a test checks that the committed page
equals this output, so the reference cannot drift from the code.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fae_cli.recipe import Recipe

HEADER = """# Recipe reference

A recipe is a TOML file with one table per section below. Every key is optional (the default
applies) and unknown keys are errors. Any value can be overridden on the command line with
`--set section.key=value` (for nested tables: `--set adapter.train.steps=100`).

This page is generated from the recipe models by `python -m fae_cli.recipe_docs`; do not edit it
by hand.
"""


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(table)"
    if value is None:
        return "none"
    return f"`{json.dumps(value, default=str)}`"


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not hasattr(annotation, "__args__") else None
    text = text or str(annotation)
    return text.replace("typing.", "").replace("pathlib.", "").replace("fae_cli.recipe.", "").replace("NoneType", "None")


def _section(lines: list[str], path: str, model: type[BaseModel]) -> None:
    lines.append(f"\n## [{path}]\n")
    if model.__doc__:
        lines.append(model.__doc__.strip().splitlines()[0] + "\n")
    lines.append("| key | type | default | description |")
    lines.append("| --- | --- | --- | --- |")
    nested = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((f"{path}.{name}", annotation))
            lines.append(f"| `{name}` | table | see [{path}.{name}] | {field.description} |")
            continue
        type_text = _type_name(annotation).replace("|", "\\|")
        lines.append(f"| `{name}` | {type_text} | {_default(field)} | {field.description} |")
    for nested_path, nested_model in nested:
        _section(lines, nested_path, nested_model)


def render_markdown() -> str:
    """Return the recipe reference page as Markdown."""
    lines = [HEADER]
    for name, field in Recipe.model_fields.items():
        _section(lines, name, field.annotation)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
