from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gssf_cli.core.config import dump_toml, from_dict, load_toml, resolve, to_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig


def test_defaults_come_from_the_dataclass() -> None:
    config = resolve(PrepareConfig, "prepare", {}, {"dataset": "synthetic", "out": "d"})
    assert config.seed == PrepareConfig.__dataclass_fields__["seed"].default
    assert config.out == Path("d")


def test_precedence_cli_over_file_over_defaults() -> None:
    file_values = {"dataset": "synthetic", "out": "from_file", "seed": 7, "regions": 3}
    config = resolve(PrepareConfig, "prepare", file_values, {"seed": 11, "regions": None})
    assert config.seed == 11
    assert config.regions == 3
    assert config.out == Path("from_file")
    assert config.concepts == 32


def test_configs_are_frozen() -> None:
    config = resolve(PrepareConfig, "prepare", {"dataset": "digits", "out": "d"})
    with pytest.raises(AttributeError):
        config.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dataset": "synthetic", "out": "d", "sede": 1}, "prepare.sede: unknown key"),
        ({"dataset": "synthetic", "out": "d", "seed": "1"}, "prepare.seed: expected an integer, got str '1'"),
        ({"dataset": "synthetic", "out": "d", "seed": True}, "prepare.seed: expected an integer"),
        ({"dataset": "synthetic", "out": "d", "force": 1}, "prepare.force: expected true or false"),
        (
            {"dataset": "synthetic", "out": "d", "dev_fraction": "x"},
            "prepare.dev_fraction: expected a number",
        ),
        ({"dataset": "images", "out": "d"}, "prepare.dataset: 'images' is not one of synthetic, digits"),
        ({"dataset": "synthetic"}, "prepare.out: required"),
        ({"dataset": "synthetic", "out": "d", "regions": 0}, "prepare.regions: must be at least 1"),
        ({"dataset": "precomp", "out": "d"}, "--source is required for --dataset precomp"),
    ],
)
def test_bad_values_name_their_key_path(values: dict[str, object], message: str) -> None:
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace("'", "'")):
        from_dict(PrepareConfig, values, "prepare")


def test_toml_round_trip(tmp_path: Path) -> None:
    config = resolve(PrepareConfig, "prepare", {"dataset": "synthetic", "out": "d", "seed": 5})
    text = dump_toml(to_dict(config))
    (tmp_path / "c.toml").write_text(text)
    again = resolve(PrepareConfig, "prepare", load_toml(tmp_path / "c.toml"))
    assert again == config
    assert tomllib.loads(dump_toml({"prepare": to_dict(config)}))["prepare"]["seed"] == 5


def test_toml_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 3\n")
    with pytest.raises(UserInputError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(UserInputError, match="config file not found"):
        load_toml(tmp_path / "missing.toml")


def test_toml_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'seed = 1\nname = "caf\xe9"\n')
    with pytest.raises(UserInputError, match=r"c\.toml: not valid TOML \(line 2 is not UTF-8"):
        load_toml(path)


def test_a_folder_is_not_a_toml_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="is a folder, not a TOML file"):
        load_toml(tmp_path)


@pytest.mark.parametrize("text", ["lr = inf", "lr = nan", "margin = -inf", "weight_decay = +inf"])
def test_non_finite_numbers_in_a_file_are_refused(tmp_path: Path, text: str) -> None:
    from gssf_cli.core.stage_configs import TrainConfig

    path = tmp_path / "t.toml"
    path.write_text(text + "\n")
    with pytest.raises(UserInputError, match=r"^train\.\w+: must be a finite number, got"):
        resolve(TrainConfig, "train", load_toml(path), {"data": "d"})


def test_a_misspelt_key_gets_did_you_mean_like_a_misspelt_flag() -> None:
    from gssf_cli.core.stage_configs import TrainConfig

    with pytest.raises(
        UserInputError, match=r"train.blok_size: unknown key \(did you mean 'block_size'\? valid keys: "
    ):
        from_dict(TrainConfig, {"data": "d", "blok_size": 8}, "train")
    with pytest.raises(UserInputError, match=r"train.zzz: unknown key \(valid keys: "):
        from_dict(TrainConfig, {"data": "d", "zzz": 8}, "train")
