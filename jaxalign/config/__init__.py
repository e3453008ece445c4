"""One YAML file per run, loaded into a validated `ml_collections.ConfigDict`.

    cfg = load_config("configs/dpo.yaml", ["dpo.beta=0.2", "train.batch_size=16"])
    save_config(cfg, f"{cfg.output_dir}/config.yaml")   # load_config reads it back equal

The schema (keys, defaults, types, choices, docs) lives in `jaxalign/config/schema.py`;
every function here derives from it. Functions are pure: they return new ConfigDicts and
never mutate their inputs. Errors are `JaxalignError`s naming the dotted key, where it was
set (file or `--set` override) and what is allowed. YAML is read with `yaml.safe_load` only.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
import yaml

from jaxalign.config.checks import coerce_sources, cross_field_errors, resolve_shorthands
from jaxalign.config.schema import (
    BOOL,
    FLOAT,
    INT,
    LIST_FLOAT,
    LIST_STR,
    MAPPING,
    SCHEMA,
    SOURCES,
    STR,
    STR_OR_LIST,
    Field,
    iter_fields,
    iter_sections,
    overrides_section,
)
from jaxalign.errors import JaxalignError
from jaxalign.runtime.paths import as_path, isfile, write_text_atomic

__all__ = [
    "SCHEMA", "Field", "default_config", "load_config", "apply_overrides", "validate",
    "save_config", "config_to_dict", "schema_help", "stage_config", "load_stage_config",
]

log = logging.getLogger(__name__)

ConfigDict = ml_collections.ConfigDict

# A plain decimal number, as a string (YAML 1.1 reads "1e-5" as a string, not a float).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Only the exponent forms YAML 1.1 misses; converted inside free-form mappings.
_EXP_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# ----------------------------------------------------------------------------- public API


def default_config() -> ConfigDict:
    """The schema's defaults as a ConfigDict."""
    return ConfigDict(_defaults(SCHEMA))


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> ConfigDict:
    """Defaults <- YAML file at `path` (None = defaults only) <- "a.b=value" overrides; validated."""
    tree, sources = _defaults(SCHEMA), {}
    if path is not None:
        path = os.fspath(path)
        _merge(tree, SCHEMA, _read_yaml(path), "", path, sources)
    _apply(tree, overrides, sources)
    return ConfigDict(_validate_tree(tree, sources))


def apply_overrides(cfg: ConfigDict | Mapping, overrides: Iterable[str]) -> ConfigDict:
    """A new config with "a.b=value" overrides applied (values parsed as YAML); types checked.

    Cross-field checks are left to `validate`, so several override steps can be chained.
    """
    tree, sources = _from_cfg(cfg), {}
    _apply(tree, overrides, sources)
    return ConfigDict(_check_types(tree, sources))


def validate(cfg: ConfigDict | Mapping) -> ConfigDict:
    """Check every key, type, choice and cross-field constraint; return the checked config.

    Raises JaxalignError listing every problem found. Missing keys take their defaults.
    """
    return ConfigDict(_validate_tree(_from_cfg(cfg), {}))


def save_config(cfg: ConfigDict | Mapping, path: str | os.PathLike) -> str:
    """Write the config as YAML (schema order) that `load_config` reads back equal."""
    path = os.fspath(path)
    as_path(path).parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    write_text_atomic(path, "# jaxalign resolved config\n" + text)
    return path


def config_to_dict(cfg: ConfigDict | Mapping) -> dict:
    """Plain nested dicts/lists (no ConfigDicts, no tuples), schema keys in schema order."""
    return _order(_plain(cfg), SCHEMA)


def schema_help() -> str:
    """One line per key: dotted key, type, default, choices and doc (for `--help` output)."""
    lines = []
    for key, f in iter_fields():
        choices = f" {{{', '.join(f.choices)}}}" if f.choices else ""
        lines.append(f"{key} ({f.type}{choices}) = {f.default!r}: {f.doc}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reading & merging


def _defaults(schema: dict) -> dict:
    return {k: copy.deepcopy(v.default) if isinstance(v, Field) else _defaults(v)
            for k, v in schema.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _order(tree: dict, schema: dict) -> dict:
    ordered = {}
    for k, node in schema.items():
        if k in tree:
            sub = tree[k]
            ordered[k] = _order(sub, node) if isinstance(node, dict) and isinstance(sub, dict) else sub
    ordered.update((k, v) for k, v in tree.items() if k not in ordered)
    return ordered


def _from_cfg(cfg: ConfigDict | Mapping) -> dict:
    tree = _defaults(SCHEMA)
    _merge(tree, SCHEMA, _plain(cfg), "", "", {})
    return tree


def _read_yaml(path: str) -> dict:
    if not isfile(path):
        raise JaxalignError(f"config file not found: {path}")
    try:
        with as_path(path).open(encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise JaxalignError(
            f"cannot parse config file {path}: {e}\n(only plain YAML is accepted: "
            "no !!python tags or other custom types)") from None
    except UnicodeDecodeError as e:
        raise JaxalignError(f"config file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise JaxalignError(f"config file {path} must hold a mapping of sections, "
                            f"got {_show(raw)}")
    return raw


def _where(source: str) -> str:
    return f" (in {source})" if source else ""


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:77] + '...' if len(text) > 80 else text} ({type(value).__name__})"


def _unknown(dotted: str, source: str, section: bool) -> JaxalignError:
    what = "section" if section else "key"
    parent, _, leaf = dotted.rpartition(".")
    node, known = SCHEMA, []
    for p in parent.split(".") if parent else ():
        if not isinstance(node.get(p), dict):  # a key that holds dots itself ('model: {".": 1}')
            break
        node = node[p]
        known.append(p)
    parent = ".".join(known)
    siblings = list(node)
    all_keys = [k for k, _ in iter_fields()] + list(iter_sections())
    if section:
        hit = difflib.get_close_matches(leaf, [s for s in siblings if isinstance(node[s], dict)], 1, 0.6)
        hit = [f"{parent}.{h}" if parent else h for h in hit]
    else:
        hit = [k for k in all_keys if k.rpartition(".")[2] == leaf]  # right key, wrong section
        hit = hit or [f"{parent}.{h}" if parent else h
                      for h in difflib.get_close_matches(leaf, siblings, 1, 0.6)]
        hit = hit or difflib.get_close_matches(dotted, [k for k, _ in iter_fields()], 1, 0.6)
    if hit:
        hint = f"did you mean '{hit[0]}'?"
    else:
        hint = f"valid keys{f' in {parent!r}' if parent else ''}: {', '.join(siblings)}"
    return JaxalignError(f"unknown config {what} '{dotted}'{_where(source)}; {hint}")


def _merge(tree: dict, schema: dict, src: Any, prefix: str, source: str, sources: dict) -> None:
    """Merge a nested mapping into `tree`, rejecting keys the schema does not know."""
    if not isinstance(src, Mapping):
        raise JaxalignError(f"config section '{prefix.rstrip('.')}' expects a mapping, "
                            f"got {_show(src)}{_where(source)}")
    for key, value in src.items():
        if not isinstance(key, str):
            raise JaxalignError(f"config keys must be strings, got {_show(key)} "
                                f"in '{prefix.rstrip('.') or '<top level>'}'{_where(source)}")
        dotted = prefix + key
        if key not in schema:
            raise _unknown(dotted, source, section=not prefix and isinstance(value, Mapping))
        node = schema[key]
        if isinstance(node, dict):
            if value is not None:  # an empty section (`dpo:` with all keys commented out) is fine
                _merge(tree[key], node, value, dotted + ".", source, sources)
        else:
            tree[key] = _plain(value)
            sources[dotted] = source


def _parse_override(item: Any) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item:
        raise JaxalignError(f"config override {item!r} is not KEY=VALUE "
                            "(e.g. --set dpo.beta=0.2)")
    key, _, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not key:
        raise JaxalignError(f"config override {item!r} has no key (e.g. --set dpo.beta=0.2)")
    if not text:
        return key, ""
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError:
        return key, text  # not YAML: take it as a plain string


def _apply(tree: dict, overrides: Iterable[str], sources: dict) -> None:
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        key, value = _parse_override(item)
        source = f"--set {item}"
        parts = key.split(".")
        node, schema = tree, SCHEMA
        for i, part in enumerate(parts):
            dotted, last = ".".join(parts[: i + 1]), i == len(parts) - 1
            if part not in schema:
                raise _unknown(dotted, source, section=i == 0 and not last)
            sub = schema[part]
            if isinstance(sub, dict):  # a section
                if last:
                    if value is not None:
                        _merge(node[part], sub, value, dotted + ".", source, sources)
                    break
                node, schema = node[part], sub
            elif last:
                node[part] = _plain(value)
                sources[dotted] = source
            elif sub.type == MAPPING:  # free-form mapping: set an inner key, e.g. model.config.hidden_size
                inner = node[part] if isinstance(node[part], dict) else {}
                node[part] = inner
                for p in parts[i + 1: -1]:
                    inner[p] = inner[p] if isinstance(inner.get(p), dict) else {}
                    inner = inner[p]
                inner[parts[-1]] = _plain(value)
                sources[dotted] = source
                break
            else:
                raise JaxalignError(f"config key '{dotted}' is a {sub.type}, not a section; "
                                    f"cannot set '{key}'{_where(source)}")


# ----------------------------------------------------------------------------- checking


def _freeform(value: Any, dotted: str, source: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or "." in k:
                raise JaxalignError(f"keys under '{dotted}' must be strings without dots, "
                                    f"got {_show(k)}{_where(source)}")
            out[k] = _freeform(v, f"{dotted}.{k}", source)
        return out
    if isinstance(value, (list, tuple)):
        return [_freeform(v, dotted, source) for v in value]
    if isinstance(value, str) and _EXP_NUMBER.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-6 as a string; HF configs mean a float
    return value


def _coerce(dotted: str, f: Field, value: Any, source: str) -> Any:
    """Check one value against its field; returns the (possibly converted) value."""
    t, ok = f.type, True
    if t == BOOL:
        ok = isinstance(value, bool)
    elif t == INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t == FLOAT:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        ok = isinstance(value, float)
    elif t == STR:
        ok = isinstance(value, str)
    elif t == SOURCES:
        value, ok = coerce_sources(dotted, value, _where(source))
    elif t in (LIST_STR, STR_OR_LIST):
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = list(value)
        else:
            ok = t == STR_OR_LIST and isinstance(value, str)
    elif t == LIST_FLOAT:
        ok = isinstance(value, (list, tuple)) and all(type(v) in (int, float) for v in value)  # not bool
        value = [float(v) for v in value] if ok else value
    elif t == MAPPING:
        if value is None:
            value = {}
        ok = isinstance(value, Mapping)
        if ok:
            value = _freeform(value, dotted, source)
    if not ok:
        raise JaxalignError(f"config key '{dotted}' expects {t}, got {_show(value)}{_where(source)}")
    # A list's entries are each one of the choices.
    for v in (value if isinstance(value, list) else [value]) if f.choices is not None else []:
        if v not in f.choices:
            allowed = ", ".join(repr(c) for c in f.choices)
            raise JaxalignError(f"config key '{dotted}' must be one of {allowed}; "
                                f"got {v!r}{_where(source)}")
    return value


def _check_types(tree: dict, sources: dict) -> dict:
    out, errors = copy.deepcopy(tree), []
    for dotted, f in iter_fields():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node[p]
        try:
            node[leaf] = _coerce(dotted, f, node[leaf], sources.get(dotted, ""))
        except JaxalignError as e:
            errors.append(str(e))
    _raise(errors or resolve_shorthands(out, sources))
    return out


def _raise(errors: list[str]) -> None:
    if len(errors) == 1:
        raise JaxalignError(errors[0])
    if errors:
        raise JaxalignError(f"{len(errors)} config errors:\n  - " + "\n  - ".join(errors))


def _validate_tree(tree: dict, sources: dict) -> dict:
    tree = _check_types(tree, sources)
    _raise([msg + _where(sources.get(key, "")) for key, msg in cross_field_errors(tree)])
    return tree


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        if isinstance(value, Mapping) and f"{prefix}{key}" not in ("model.config", "mesh.rules"):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def stage_config(cfg: ConfigDict, stage: str, extra: Iterable[str] = ()) -> ConfigDict:
    """The config of one stage of a pipeline: `stage` set, its overrides (schema.overrides_section: nested mappings,
    e.g. {train: {max_steps: 50}}; an unknown key is an error naming it and the closest valid key), then `extra`."""
    section = overrides_section(stage)
    overrides = _flatten(config_to_dict(cfg)[section]["overrides"])
    sets = [f"stage={stage}"] + [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix(chr(10) + '...')}"
                                 for k, v in overrides]
    try:
        return validate(apply_overrides(cfg, [*sets, *extra]))
    except JaxalignError as e:
        raise JaxalignError(f"{section}.overrides: {e}") from None


def load_stage_config(path: str | os.PathLike, overrides: Iterable[str] = (), stage: str = "") -> ConfigDict:
    """The config one stage runs with, resolved as every command resolves it (`train`, `eval`, `plan`,
    `data inspect`, each stage of `pipeline`): the file, then `{stage}.overrides` of the stage (`stage`,
    else the config's own), then the `--set` overrides, the most explicit, again on top."""
    overrides = list(overrides)
    cfg = load_config(path, overrides)
    return stage_config(cfg, stage or cfg.stage, overrides)
