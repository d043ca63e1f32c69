from __future__ import annotations

from pathlib import Path

from fae_cli.recipe_docs import render_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    committed = (ROOT / "docs" / "recipe.md").read_text(encoding="utf-8")
    assert committed == render_markdown(), "docs/recipe.md is stale: run `python -m fae_cli.recipe_docs > docs/recipe.md`"


def test_every_recipe_file_validates():
    from fae_cli.recipe import load_recipe

    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert recipes
    for path in recipes:
        load_recipe(path)
