"""Cache storage: how the entries a policy keeps are held (codecs), and where (tiers).

  base.py      the codec contract (plugins implement it) and StorageConfig
  integer.py   int8 / int4, KIVI's groups (keys per channel, values per token)
  bnb.py       bnb-int8 / bnb-int4, bitsandbytes blockwise (CUDA only)
  buffers.py   preallocated per-layer buffers, written and compacted in place
  layer_stores.py  one layer's storage (fp or through a codec), what PolicyLayer delegates to
  host.py      the host tier: evicted entries in host memory, Quest block summaries, recall
  minicache.py cross-layer merging: adjacent layers share one direction per token (MiniCache)
  codecs.py    the codec registry (built-ins and plugins' codecs, by name)
  policy_storage.py  a policy's StorageConfig, cache names ('h2o-int4'), recorded parameters
"""

from __future__ import annotations

from kvstudio.core.storage.base import MERGE_METHODS, Codec, CodecError, StorageConfig
from kvstudio.core.storage.bnb import BnbInt4Codec, BnbInt8Codec
from kvstudio.core.storage.codecs import (BUILT_IN, FP, available_codecs, codec_class, codec_source, create_codec, register_codec,
                     unregister_codec)
from kvstudio.core.storage.integer import Int4Codec, Int8Codec
from kvstudio.core.storage.layer_stores import LayerStore
from kvstudio.core.storage.policy_storage import (STORAGE_KEY, attach, cache_label, cache_name, changed_fields,
                             merge_in_name, split_cache_name, storage_config, storage_fields, storage_from_options,
                             storage_of, stored_parameters)

__all__ = ["BUILT_IN", "FP", "MERGE_METHODS", "STORAGE_KEY", "BnbInt4Codec", "BnbInt8Codec", "Codec", "CodecError", "LayerStore",
           "Int4Codec", "Int8Codec", "StorageConfig", "attach", "available_codecs", "cache_label",
           "cache_name", "changed_fields", "codec_class", "codec_source", "create_codec", "merge_in_name",
           "register_codec", "split_cache_name", "storage_config", "storage_fields", "storage_from_options",
           "storage_of", "stored_parameters", "unregister_codec"]
