"""A policy and its storage: how a policy object carries its StorageConfig, the names a cache goes by
('h2o-int4', 'full+minicache'), and the parameters a run records and builds a policy back from.

A cache is named `<policy>-<codec>` (KeysAndValues' convention), `+host` with the host tier and
`+minicache` with cross-layer merging: `split_cache_name("h2o-int4")` gives ("h2o", "int4").
"""

from __future__ import annotations

from kvstudio.core.params import parse_text
from kvstudio.core.storage.base import MERGE_METHODS, CodecError, StorageConfig
from kvstudio.core.storage.codecs import FP, _CODECS

def merge_in_name(name: str) -> str | None:
    """'h2o+minicache' or 'h2o-int4+minicache' -> 'minicache': cross-layer merging named in a cache's
    name (storage/minicache.py); None when it names none."""
    base, plus, method = name.rpartition("+")
    return method if plus and base and method in MERGE_METHODS and method != "none" else None


def split_cache_name(name: str) -> tuple[str, str | None]:
    """'h2o-int4' -> ('h2o', 'int4'); 'h2o' -> ('h2o', None). The codec is the longest known suffix.
    A merge suffix ('h2o-int4+minicache') is dropped here; `merge_in_name` reads it."""
    if merge_in_name(name):
        name = name.rpartition("+")[0]
    for codec in sorted(_CODECS.classes, key=len, reverse=True):
        if name.endswith("-" + codec) and len(name) > len(codec) + 1:
            return name[: -len(codec) - 1], codec
    return name, None


def attach(policy, config: StorageConfig):
    """Give a policy object its storage; the cache built for it reads `policy.storage`."""
    config.validate()
    policy.storage = config
    return policy


def storage_of(policy) -> StorageConfig:
    return getattr(policy, "storage", None) or StorageConfig()


def cache_name(policy) -> str:
    """'h2o-int4' for a policy stored in int4; the policy's name alone for fp on the device tier."""
    return cache_name_for(policy.name, storage_of(policy))


def cache_name_for(policy: str, storage: StorageConfig) -> str:
    """'h2o-int4+host' from a policy's name and a storage."""
    name = policy if storage.codec == FP else f"{policy}-{storage.codec}"
    return name + ("+host" if storage.tier == "host" else "") + ("" if storage.merge == "none" else f"+{storage.merge}")


def cache_label(name: str, fields: dict | None = None) -> str:
    """'full+minicache', 'h2o-int8+host': the cache a stored run used, from its policy (or cache) name and
    its "storage" parameters (a run history row's)."""
    return cache_name_for(split_cache_name(name)[0], storage_config(storage_fields(name, fields)))


def storage_fields(name: str, fields: dict | None = None) -> dict:
    """The StorageConfig fields that a cache name ('h2o-int4+minicache') and a "storage" parameter dict
    set together; the name's codec and merge win (a Compare column's name over the form's settings)."""
    fields = dict(fields or {})
    codec = split_cache_name(name)[1]
    if codec is not None:
        fields["codec"] = codec
    if merge_in_name(name):
        fields["merge"] = merge_in_name(name)
    return fields


def storage_config(fields: dict) -> StorageConfig:
    """A StorageConfig from stored fields, leaving out names it does not know (a row from a newer version)."""
    from dataclasses import fields as config_fields

    known = {f.name for f in config_fields(StorageConfig)}
    return StorageConfig(**{k: v for k, v in fields.items() if k in known})


def changed_fields(config: StorageConfig) -> dict:
    """The fields of `config` that differ from the defaults: what a stored run keeps of its storage
    (nothing for fp on the device). The merge settings only when merging: otherwise they do nothing."""
    from dataclasses import asdict

    defaults = asdict(StorageConfig())
    changed = {k: v for k, v in asdict(config).items() if v != defaults[k]}
    if config.merge == "none":
        changed = {k: v for k, v in changed.items() if not k.startswith("merge")}
    return changed


def stored_parameters(policy) -> dict:
    """A policy's parameters as a run records them: its config, and under "storage" the storage fields
    that differ from the defaults (kvstudio.core.spec reads them back)."""
    changed = changed_fields(storage_of(policy))
    return policy.config.as_dict() | ({STORAGE_KEY: changed} if changed else {})


STORAGE_KEY = "storage"  # in a policy's parameter dict (the studio's run requests): the StorageConfig fields


def storage_from_options(options: dict) -> tuple[StorageConfig | None, dict]:
    """Split NAME=VALUE options (an eval variant) into a StorageConfig (the ones named like its fields,
    typed from text by each field's declaration: "on" is True, "none" is None where None is accepted)
    and the rest; (None, options) when none is a storage field."""
    specs = {spec.name: spec for spec in StorageConfig.parameters()}
    given = {k: v for k, v in options.items() if k in specs}
    if not given:
        return None, options
    typed = {key: parse_text(specs[key], value, f"storage option {key}={value}", CodecError)
             for key, value in given.items()}
    loose = [k for k in typed if k.startswith("merge_")]  # merge settings with nothing merged: refused, not ignored
    if loose and typed.get("merge", "none") == "none":
        raise CodecError(f"{loose[0]}={given[loose[0]]} needs merge=minicache in the same variant: without it no "
                         "layers are merged")
    return StorageConfig(**typed), {k: v for k, v in options.items() if k not in specs}
