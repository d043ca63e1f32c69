from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fae_cli.errors import FaeError
from fae_cli.recipe import Recipe, load_recipe, recipe_hash, to_toml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_defaults_validate():
    recipe = load_recipe()
    assert isinstance(recipe, Recipe)
    assert recipe.adapter.latent_channels == 32


def test_misspelled_key_names_path_and_closest(tmp_path):
    path = write(tmp_path, "[adapter.train]\nlearnig_rate = 1e-3\n")
    with pytest.raises(FaeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert "adapter.train.learnig_rate" in message
    assert "adapter.train.learning_rate" in message
    assert "\n" not in message


def test_unknown_section_names_closest():
    with pytest.raises(FaeError) as error:
        load_recipe(overrides=["adaptr.kl_weight=0.1"])
    assert "'adaptr'" in str(error.value)
    assert "'adapter'" in str(error.value)


def test_set_unknown_path_names_closest():
    with pytest.raises(FaeError) as error:
        load_recipe(overrides=["adapter.train.learnig_rate=0.1"])
    assert "adapter.train.learnig_rate" in str(error.value)
    assert "adapter.train.learning_rate" in str(error.value)


def test_set_below_scalar_is_rejected():
    with pytest.raises(FaeError) as error:
        load_recipe(overrides=["adapter.kl_weight.x=1"])
    assert "adapter.kl_weight" in str(error.value)


def test_wrong_type_names_value_and_type():
    with pytest.raises(FaeError) as error:
        load_recipe(overrides=["adapter.train.steps=abc"])
    message = str(error.value)
    assert "'abc'" in message
    assert "adapter.train.steps" in message
    assert "integer" in message


def test_set_coerces_by_model():
    recipe = load_recipe(overrides=["adapter.train.steps=7", "adapter.kl_weight=1e-5", "data.source=/tmp/x", "extract.flip=true"])
    assert recipe.adapter.train.steps == 7
    assert recipe.adapter.kl_weight == pytest.approx(1e-5)
    assert recipe.data.source == "/tmp/x"
    assert recipe.extract.flip is True


def test_set_without_equals_is_rejected():
    with pytest.raises(FaeError, match="section.key=value"):
        load_recipe(overrides=["adapter.train.steps"])


def test_set_overrides_file(tmp_path):
    path = write(tmp_path, "[adapter.train]\nsteps = 5\n")
    assert load_recipe(path, ["adapter.train.steps=9"]).adapter.train.steps == 9


def test_toml_round_trip_equal_recipe_and_hash(tmp_path):
    recipe = load_recipe(overrides=[
        "adapter.heads=8",
        "sample.guidance=[{t_from = 1.0, t_to = 0.7, scale = 2.5}]",
        "encoder.weights='/w/x.safetensors'",
    ])
    again = load_recipe(write(tmp_path, to_toml(recipe)))
    assert again == recipe
    assert recipe_hash(again) == recipe_hash(recipe)


def test_hash_changes_with_value_and_is_stable():
    base = load_recipe()
    assert recipe_hash(base) == recipe_hash(load_recipe())
    assert recipe_hash(base) != recipe_hash(load_recipe(overrides=["adapter.kl_weight=0.5"]))


def test_section_hash_ignores_other_sections():
    base = load_recipe()
    changed = load_recipe(overrides=["sample.steps=3"])
    assert recipe_hash(base, "adapter") == recipe_hash(changed, "adapter")
    assert recipe_hash(base, "sample") != recipe_hash(changed, "sample")


def test_invalid_toml_is_one_line_error(tmp_path):
    with pytest.raises(FaeError, match="invalid TOML"):
        load_recipe(write(tmp_path, "[adapter\n"))


def test_every_field_has_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    for section in Recipe.model_fields.values():
        walk(section.annotation)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fae_cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_misspelled_key_exits_2_one_line(tmp_path):
    path = write(tmp_path, "[adapter.train]\nlearnig_rate = 1e-3\n")
    result = run_cli("train-adapter", "--recipe", str(path), "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "adapter.train.learning_rate" in lines[0]


def test_cli_set_wrong_type_exits_2(tmp_path):
    result = run_cli("train-adapter", "--set", "adapter.train.steps=abc", "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "'abc'" in result.stderr


def test_set_error_names_override(tmp_path):
    path = write(tmp_path, "[adapter]\nlatent_channels = 8\n")
    with pytest.raises(FaeError) as error:
        load_recipe(path, ["evaluate.metrics=['fid', 'fdd']"])
    assert str(error.value).startswith("--set evaluate.metrics: invalid value 'fdd' for 'evaluate.metrics[1]'")
    bad_file = write(tmp_path, "[adapter]\nlatent_channels = -1\n")
    with pytest.raises(FaeError) as error:
        load_recipe(bad_file, ["adapter.kl_weight=0.5"])
    assert str(error.value).startswith(f"{bad_file}: invalid value -1 for 'adapter.latent_channels'")


def test_default_run_name_is_not_the_quickstart():
    # The quickstart recipe writes runs/quickstart; bare defaults must not land in the same folder.
    quickstart = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
    assert load_recipe().run.name != quickstart.run.name


def test_cli_dry_run_flags_missing_inputs(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = run_cli("run", str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"),
                     "--set", f"data.source='{missing}'", "--set", f"run.out_dir='{tmp_path / 'runs'}'", "--dry-run")
    assert result.returncode == 0, result.stderr
    output = " ".join((result.stdout + result.stderr).split())
    assert f"in images: {missing} (train split) [MISSING]" in output
    assert f"in feature cache: {tmp_path / 'runs' / 'quickstart' / 'features'} [made by extract]" in output
    assert f"1 input path(s) missing, the run would stop at the first: {missing}" in output
    assert not (tmp_path / "runs").exists()


def test_cli_dry_run_embedded_data_found(tmp_path):
    result = run_cli("extract", "--set", f"run.out_dir='{tmp_path}'", "--dry-run")
    output = " ".join((result.stdout + result.stderr).split())
    assert "in images: fashion-mnist (train split) [found]" in output
    assert "missing" not in output


def test_cli_option_error_names_the_option():
    result = run_cli("sample", "-n", "0", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --num-samples: invalid value 0 for 'sample.num_samples': input should be greater than or equal to 1"


def test_set_list_error_shows_list_syntax():
    with pytest.raises(FaeError) as error:
        load_recipe(None, ["evaluate.metrics=fid"])
    assert str(error.value).endswith("""input should be a valid list; write a list in TOML syntax, e.g. --set 'evaluate.metrics=["fid"]'""")


def test_cli_dry_run_rejects_unknown_generator(tmp_path):
    result = run_cli("run", str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"),
                     "--set", "generator.model='LightningDiT-XXL/1'", "--set", f"run.out_dir='{tmp_path}'", "--dry-run")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: unknown diffusion model 'LightningDiT-XXL/1' (generator.model): use one of")
    assert list(tmp_path.iterdir()) == []


def test_cli_dry_run_flags_hub_downloads(tmp_path):
    result = run_cli("extract", "--encoder", "dinov2-b", "--set", f"run.out_dir='{tmp_path}'", "--dry-run")
    assert result.returncode == 0, result.stderr
    output = " ".join((result.stdout + result.stderr).split())
    assert "in encoder: dinov2-b (downloads on first use: Hugging Face hub via timm" in output
    assert "[download]" in output
    assert "note: 1 input(s) download on first use, so the run needs network access or a filled cache: dinov2-b" in output


def test_cli_stage_dry_run_builds_models(tmp_path):
    result = run_cli("train-generator", "--set", "generator.model='LightningDiT-XXL/1'", "--set", f"run.out_dir='{tmp_path}'", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown diffusion model 'LightningDiT-XXL/1' (generator.model): use one of")


def test_cli_encoder_input_size_names_the_key():
    result = run_cli("run", str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"),
                     "--set", "encoder.name='dinov2-s'", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: encoder.input_size = 128 is not a multiple of dinov2-s's patch size 14; use 126 or 140"


def test_cli_error_keeps_bracketed_section():
    # Rich markup must not swallow "[adapter]" in an error message.
    result = run_cli("train-adapter", "--set", "adapter.foo=1", "--dry-run")
    assert result.returncode == 2
    assert "valid keys in [adapter]: kind, layers" in result.stderr


def test_cli_dry_run_plan_on_stdout(tmp_path):
    result = run_cli("train-adapter", "--set", f"run.out_dir='{tmp_path}'", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "plan (dry run: nothing was run)" in result.stdout
    assert "[adapter]" in result.stdout


def test_cli_probe_dry_run_marks_holdout_as_made(tmp_path):
    result = run_cli("evaluate", "probe", "--set", f"run.out_dir='{tmp_path}'", "--dry-run")
    output = " ".join(result.stdout.split())
    assert f"in held-out features: {tmp_path / 'default' / 'features-holdout'} (made first when missing) [made by this stage]" in output
    assert "features-holdout" not in output.split("warning:")[-1]


def test_cli_logs_plain_lines_off_terminal(tmp_path):
    # A deep output folder makes the path longer than 80 columns: it must stay on one line.
    out = tmp_path / ("x" * 60) / "features"
    result = run_cli("extract", "--set", "data.limit=4", "--set", "extract.batch_size=4", "--set", "run.device='cpu'", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "wrote 4 feature rows" in line]
    assert len(lines) == 1
    assert f"INFO wrote 4 feature rows to {out} (0 skipped)" in lines[0]
    assert lines[0] == lines[0].rstrip()


def test_cli_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "train-adapter", "--set", "adapter.train.steps=abc", "--dry-run")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_cli_version_and_help():
    from fae_cli import __version__

    version = run_cli("--version")
    assert version.returncode == 0
    assert __version__ in version.stdout + version.stderr
    help_text = run_cli("--help")
    assert help_text.returncode == 0
    for command in ("extract", "train-adapter", "train-decoders", "train-generator", "sample", "evaluate", "run"):
        assert command in help_text.stdout


def test_cli_dry_run_prints_plan_and_writes_nothing(tmp_path):
    result = run_cli("train-adapter", "--set", f"run.out_dir='{tmp_path}'", "--set", "adapter.train.steps=3", "--dry-run")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "steps = 3" in output
    assert "adapter" in output
    assert list(tmp_path.iterdir()) == []
