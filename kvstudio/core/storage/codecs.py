"""The codec registry: built-in codecs and those plugin files add, by name (`--codec NAME`)."""

from __future__ import annotations

from kvstudio.core.registry import BUILT_IN, Registry
from kvstudio.core.storage.base import Codec, CodecError, StorageConfig
from kvstudio.core.storage.bnb import BnbInt4Codec, BnbInt8Codec
from kvstudio.core.storage.integer import Int4Codec, Int8Codec

FP = "fp"
_CODECS: Registry[type[Codec] | None] = Registry("codec", "codecs", CodecError)
_CODECS.register(FP, None)  # fp has no encoder: the stores hold tensors as they are
_SUMMARIES = {FP: "the model's own dtype, as computed (bit-identical to no codec)"}


def register_codec(codec_class: type[Codec], source: str = BUILT_IN) -> type[Codec]:
    return _CODECS.register(codec_class.name, codec_class, source)


def unregister_codec(name: str) -> None:
    _CODECS.unregister(name)


for _builtin in (Int8Codec, Int4Codec, BnbInt8Codec, BnbInt4Codec):
    register_codec(_builtin)


def available_codecs() -> dict[str, str]:
    """Codec name -> one-line summary."""
    return {name: _SUMMARIES.get(name) or (cls.summary if cls else "") for name, cls in _CODECS.classes.items()}


def codec_source(name: str) -> str | None:
    return _CODECS.source_of(name)


def codec_class(name: str) -> type[Codec] | None:
    return _CODECS.get(name)


def create_codec(config: StorageConfig) -> Codec | None:
    """The codec object for a run's storage; None for fp."""
    cls = codec_class(config.codec)
    return None if cls is None else cls(group_size=config.group_size)
