"""The YAML run configuration: validation with suggestions, relative paths, round trip."""

from __future__ import annotations

import pytest

from allegro_fast.run_config import ConfigError, RunConfig, load_run_config


def minimal(**sections):
    values = {"data": {"train_file": "frames.extxyz"}}
    values.update(sections)
    return values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trainig": {}}, "unknown key 'trainig'; did you mean 'training'?"),
        ({"training": {"learning_rat": 0.01}}, "unknown key 'training.learning_rat'; did you mean 'training.learning_rate'?"),
        ({"training": {"max_epoch": 3}}, "did you mean 'training.max_epochs'?"),
        ({"model": {"rmax": 4.0}}, "unknown key 'model.rmax'; did you mean 'model.r_max'?"),
        ({"data": {"train_file": "x.xyz", "learning_rate": 0.01}},
         "unknown key 'data.learning_rate'; did you mean 'training.learning_rate' (in another section)?"),
        ({"training": {"batch_size": "5"}}, "training.batch_size = '5' must be int"),
        ({"training": {"optimizer": "adamw"}}, "did you mean 'adam'?"),
        ({"training": {"dtype": "float16"}}, "dtype must be 'float32' or 'float64'"),
        ({"model": {"avg_num_neighbors": 12.0}}, "fitted from the training set"),
        ({"model": {"l_max": 5}}, "l_max must be 1, 2 or 3"),
        ({"model": {"preset": "rmd71"}}, "did you mean 'rmd17'?"),
        ({"data": {"train_file": "x.xyz", "energy_unit": "kcal/mole"}}, "did you mean 'kcal/mol'?"),
        ({"data": {"train_file": "x.xyz", "n_train": 1.5}}, "a fraction must lie strictly between 0 and 1"),
        ({"data": {}}, "data.train_file is required"),
    ],
)
def test_bad_keys_and_values_are_named(values, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(minimal(**values))
    assert message in str(error.value)


def test_yaml_file_relative_paths_round_trip_and_error_names_the_file(tmp_path):
    path = tmp_path / "sub" / "run.yaml"
    path.parent.mkdir()
    path.write_text(
        "seed: 3\n"
        "data:\n  train_file: train.extxyz\n  test_file: /abs/test.extxyz\n  energy_unit: kcal/mol\n  n_train: 10\n  n_val: 0.2\n"
        "model:\n  preset: speed\n  num_layers: 2\n"
        "training:\n  learning_rate: 0.01\n  max_time_minutes: 1.5\n  grad_clip_norm: 10\n"
    )
    config = load_run_config(path)
    assert config.seed == 3 and config.split_seed == 3
    assert config.data.train_file == str(path.parent / "train.extxyz")
    assert config.data.test_file == "/abs/test.extxyz"
    assert config.data.n_train == 10 and config.data.n_val == 0.2
    model = config.model_config(["Ag"])
    assert model.type_names == ("Ag",) and model.num_layers == 2 and model.l_max == 1  # preset + override
    assert config.training.grad_clip_norm == 10
    assert RunConfig.from_dict(config.to_dict()) == config

    path.write_text("data:\n  train_file: a.xyz\ntraining:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'training.batchsize'; did you mean 'training.batch_size'"):
        load_run_config(path)
    path.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(path)
    with pytest.raises(FileNotFoundError):
        load_run_config(tmp_path / "missing.yaml")


def test_type_names_from_data_unless_given():
    config = RunConfig.from_dict(minimal(model={"type_names": ["O", "H"]}))
    assert config.model_config(["H", "C", "O"]).type_names == ("O", "H")
    assert RunConfig.from_dict(minimal()).model_config(["H", "C"]).type_names == ("H", "C")
