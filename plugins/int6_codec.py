"""An example codec plugin: 6-bit integers on the codec contract (kvstudio.core.storage.base).

It reuses the int8 codec's arithmetic with 63 levels, one code per byte (no packing): an example
of the contract, not a memory saver over int8. `kvstudio run --policy h2o-int6 ...` uses it.
"""

from kvstudio.core.storage.integer import IntegerCodec


class Int6Codec(IntegerCodec):
    name = "int6"
    summary = "6-bit integers (one a byte), KIVI groups: an example codec plugin"
    bits = 6
