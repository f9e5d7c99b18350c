import json
import math
from dataclasses import fields, replace

import pytest

from core import config as cfgmod
from core.config import ConfigError, RunConfig, StageConfig


def test_presets_are_valid_and_match_the_recipe():
    for name in cfgmod.PRESETS:
        assert cfgmod.validate(cfgmod.preset_config(name)) == [], name
    two = cfgmod.preset_stages("Two-stage", lr=0.01)
    assert two[0].groups == ("layer4", "fc")
    assert set(two[1].groups) == {"layer3", "layer4", "fc"}
    assert two[1].lr == pytest.approx(0.001) and two[1].schedule == "cosine"
    assert cfgmod.preset_stages("All at once")[0].groups == cfgmod.LAYER_GROUPS
    assert cfgmod.preset_stages("Head only")[0].groups == ("fc",)
    assert len(cfgmod.preset_stages("Gradual")) == 3


def test_fast_transfer_is_one_cached_stage_scaled_by_the_preset_knobs():
    """Fast transfer: layer2..fc on the cached outputs of conv1+layer1, 2 x epochs (the total
    of a two-stage preset), at FAST_TRANSFER_LR_MULT x the preset LR, cosine."""
    [stage] = cfgmod.preset_stages("Fast transfer", epochs=3, lr=0.02)
    assert stage.groups == ("layer2", "layer3", "layer4", "fc")
    assert stage.feature_cache and stage.schedule == "cosine"
    assert stage.epochs == 6
    assert stage.lr == pytest.approx(cfgmod.FAST_TRANSFER_LR_MULT * 0.02)
    # At the defaults its LR sits on the form's grid: New run shows it without an extra value.
    assert cfgmod.preset_stages("Fast transfer")[0].lr in cfgmod.LR_GRID
    assert "Fast transfer" in cfgmod.PRESETS and "Fast transfer" in cfgmod.PRESET_DESCRIPTIONS


def test_errors_name_the_field_and_stage():
    cfg = cfgmod.with_stage(cfgmod.preset_config("Two-stage"), 1, lr=0.0)
    assert cfgmod.validate(cfg) == ["stage 2: learning rate must be greater than 0"]
    cfg = cfgmod.with_stage(cfg, 0, groups=())
    errors = cfgmod.validate(cfg)
    assert "stage 1: trains nothing; pick at least one layer group" in errors


@pytest.mark.parametrize("change, needle", [
    ({"batch_size": 0}, "batch_size"),
    ({"resolution": 16}, "resolution"),
    ({"val_fraction": math.nan}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"data_source": "folder", "data_path": ""}, "data_path"),
    ({"weights": "file", "weights_path": ""}, "weights_path"),
    ({"classes": ("cat",)}, "classes"),
    ({"stages": ()}, "stages"),
    ({"stages": tuple(StageConfig() for _ in range(5))}, "stages"),
])
def test_invalid_run_fields(change, needle):
    errors = cfgmod.validate(replace(RunConfig(), **change))
    assert errors and any(e.startswith(needle) for e in errors), errors


@pytest.mark.parametrize("change, needle", [
    ({"lr": math.inf}, "learning rate"),
    ({"lr": -1.0}, "learning rate"),
    ({"epochs": 0}, "epochs"),
    ({"groups": ("layer9",)}, "unknown layer group"),
    ({"schedule": "linear"}, "schedule"),
    ({"warmup_epochs": 3.0, "epochs": 2}, "warm-up"),
    ({"group_lr_mult": 0.0}, "multiplier"),
    ({"weight_decay": -1e-4}, "weight decay"),
])
def test_invalid_stage_fields(change, needle):
    cfg = cfgmod.with_stage(RunConfig(), 0, **change)
    errors = cfgmod.validate(cfg)
    assert any(e.startswith("stage 1:") and needle in e for e in errors), errors


def test_json_round_trip_is_exact():
    cfg = replace(cfgmod.preset_config("Gradual", epochs=2, lr=0.05), classes=("cat", "dog"), seed=7)
    assert cfgmod.from_json(cfgmod.to_json(cfg)) == cfg


def test_unknown_keys_and_wrong_types_are_named():
    d = cfgmod.to_dict(RunConfig())
    d["learning_rate"] = 0.1
    d["stages"][1]["epoch"] = 3
    d["batch_size"] = "128"
    with pytest.raises(ConfigError) as exc:
        cfgmod.from_dict(d)
    text = str(exc.value)
    assert "learning_rate: unknown key" in text
    assert "stage 2: epoch: unknown key" in text
    assert "batch_size: expected int" in text


def test_bool_is_not_an_int_and_nan_is_rejected():
    d = cfgmod.to_dict(RunConfig())
    d["seed"] = True
    d["stages"][0]["lr"] = float("nan")
    with pytest.raises(ConfigError) as exc:
        cfgmod.from_dict(d)
    assert any(e.startswith("seed") for e in exc.value.errors)
    assert any("stage 1: learning rate" in e for e in exc.value.errors)


def test_bad_json_text():
    with pytest.raises(ConfigError, match="not valid JSON"):
        cfgmod.from_json("{nope")
    with pytest.raises(ConfigError, match="expected an object"):
        cfgmod.from_dict([1, 2])


def test_flatten_gives_one_display_value_per_field():
    flat = cfgmod.flatten(cfgmod.to_dict(replace(cfgmod.preset_config("Two-stage"),
                                                 classes=("cat", "dog"))))
    assert flat["stage 2.lr"] == pytest.approx(0.001)
    assert flat["stage 1.groups"] == "layer4+fc" and flat["classes"] == "cat,dog"
    assert "stages" not in flat
    json.dumps(cfgmod.to_dict(RunConfig()))  # JSON-safe


# ---------------------------------------------------------------- the schema


def test_every_field_but_the_stage_list_has_a_spec():
    for cls in (RunConfig, StageConfig):
        named = {f.name for f, _ in cfgmod.specs(cls)}
        assert named == {f.name for f in fields(cls)} - {"stages"}, cls
        for f, spec in cfgmod.specs(cls):
            assert spec.label and spec.widget in cfgmod.WIDGETS, f.name
            assert not (spec.choices and spec.suggested), f.name


def test_closed_choices_are_the_validated_ones():
    assert cfgmod.field_spec(StageConfig, "groups").choices == cfgmod.LAYER_GROUPS
    assert cfgmod.field_spec(StageConfig, "schedule").choices == cfgmod.SCHEDULES
    assert cfgmod.field_spec(RunConfig, "weights").choices == cfgmod.WEIGHT_SOURCES
    assert cfgmod.field_spec(RunConfig, "device").choices == cfgmod.DEVICES


def test_a_grid_keeps_the_exact_value():
    lr = cfgmod.field_spec(StageConfig, "lr")
    third = cfgmod.PRESET_LR / 3
    options = lr.options(third)
    assert third in options and list(options) == sorted(options)
    assert set(options) - {third} == set(cfgmod.LR_GRID)
    assert lr.options(0.01) == cfgmod.LR_GRID
    assert lr.choice_label(0.002) == "0.002"
    assert cfgmod.field_spec(RunConfig, "device").choice_label("cpu") == "CPU"


@pytest.mark.parametrize("preset", cfgmod.PRESETS)
def test_form_state_round_trips_every_preset(preset):
    cfg = replace(cfgmod.preset_config(preset), classes=("cat", "dog"), seed=4, augment=False)
    state = cfgmod.form_state(cfg, "p.")
    for i, stage in enumerate(cfg.stages):
        state.update(cfgmod.form_state(stage, f"p.s{i}."))
    stages = tuple(cfgmod.from_form(StageConfig, state, f"p.s{i}.") for i in range(len(cfg.stages)))
    assert stages == cfg.stages  # exact learning rates: nothing snapped to a grid
    assert cfgmod.from_form(RunConfig, state, "p.", stages=stages) == cfg
    assert state["p.s0.groups.fc"] is True and state["p.classes"] == ["cat", "dog"]
    assert "p.threads" not in state  # no widget: from_form keeps the default


def test_form_state_gives_number_widgets_their_field_type():
    state = cfgmod.form_state(StageConfig(warmup_epochs=1), "")
    assert type(state["warmup_epochs"]) is float


def test_seed_is_bounded_to_what_torch_takes():
    """A seed torch.Generator cannot take fails validation, not the run."""
    import torch

    top = replace(RunConfig(), seed=cfgmod.MAX_SEED)
    assert cfgmod.validate(top) == []
    torch.Generator().manual_seed(top.seed + 1)  # the largest offset a run adds still works
    for seed in (10**40, cfgmod.MAX_SEED + 1, -1):
        errors = cfgmod.validate(replace(RunConfig(), seed=seed))
        assert errors and errors[0].startswith("seed must be a whole number from 0 to"), seed
    d = cfgmod.to_dict(RunConfig())
    d["seed"] = 10**40
    with pytest.raises(ConfigError, match="seed must be"):
        cfgmod.from_json(json.dumps(d))


def test_deeply_nested_and_non_utf8_json_are_plain_config_errors():
    with pytest.raises(ConfigError, match="nested more than"):
        cfgmod.from_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        cfgmod.from_json('{"name": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not a usable JSON file"):
        cfgmod.from_json('{"seed": ' + "9" * 5000 + "}")
    # Brackets inside strings do not count as nesting; UTF-8 bytes (with a BOM) are read.
    d = cfgmod.to_dict(RunConfig())
    d["data_path"] = "[" * 100
    assert cfgmod.from_json(("\ufeff" + json.dumps(d)).encode()).data_path == "[" * 100
