"""Property-based fuzzing of the image decoder: any bytes give a clean error or a valid array."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.data.images import ImageError, decode


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [encoded("PNG"), encoded("JPEG")]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[position:]
            if not data:
                break
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.binary(max_size=512)))
def test_decoding_any_bytes_gives_a_clean_error_or_a_valid_array(data):
    try:
        pixels = decode(data, "fuzzed", (16, 16), 3)
    except ImageError as error:
        assert str(error).startswith("fuzzed: ")
    else:
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
