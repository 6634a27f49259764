"""The published JSON Schema and the validator agree on a corpus of files."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from runtime.core.compile import built_in_rules
from runtime.core.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus"
SCHEMA = json.loads((ROOT / "config" / "network.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def files(kind: str) -> list[Path]:
    found = sorted((CORPUS / kind).glob("*.json"))
    assert found, f"corpus {kind} is empty"
    return found


def test_schema_is_valid_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("path", files("valid"), ids=lambda p: p.name)
def test_both_accept(path: Path) -> None:
    VALIDATOR.validate(json.loads(path.read_text()))
    parse_config(path.read_text(), str(path))


@pytest.mark.parametrize("path", files("invalid"), ids=lambda p: p.name)
def test_both_reject(path: Path) -> None:
    assert list(VALIDATOR.iter_errors(json.loads(path.read_text()))), "schema accepted it"
    with pytest.raises(ConfigError):
        parse_config(path.read_text(), str(path))


@pytest.mark.parametrize("path", files("semantic-invalid"), ids=lambda p: p.name)
def test_validator_only_rejections(path: Path) -> None:
    """Checks JSON Schema cannot express (public suffix list, IDNA): the schema lets
    them through, the validator catches them. Kept few and listed here on purpose."""
    assert not list(VALIDATOR.iter_errors(json.loads(path.read_text())))
    with pytest.raises(ConfigError) as info:
        parse_config(path.read_text(), str(path))
    assert "Fix:" in str(info.value)


def test_shipped_defaults_are_valid_rules() -> None:
    data = json.loads((ROOT / "config" / "defaults.json").read_text())
    assert set(data) == {"description", "allowed_rules", "package_registries"}
    VALIDATOR.validate({"allowed_rules": data["allowed_rules"]})
    assert built_in_rules(data["allowed_rules"])
