"""The frame record on the ``frames`` topic (DESIGN contract).

The Arrow schema itself lives in :mod:`serving.frames` because Serve replicas decode frames
(imports flow streams -> serving); this module is where stream code finds it.
"""

from serving.frames import (
    ARROW_CONTENT_TYPE,
    ENCODINGS,
    FRAME_SCHEMA,
    FrameRecord,
    FrameSchemaError,
    decode_frames,
    encode_frames,
    warm_up,
)

__all__ = [
    "ARROW_CONTENT_TYPE",
    "ENCODINGS",
    "FRAME_SCHEMA",
    "FrameRecord",
    "FrameSchemaError",
    "decode_frames",
    "encode_frames",
    "warm_up",
]
