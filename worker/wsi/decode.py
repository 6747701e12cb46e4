"""JPEG decoding with DALI: one pipeline definition, `device="cpu"` or `"mixed"` (nvJPEG).

TIFF and SVS files keep JPEG tiles in two ways, and `jpeg_stream` turns either into a
stream any JPEG decoder reads exactly as OpenSlide (libtiff + libjpeg) does:

- abbreviated tiles (no tables) plus one JPEGTables tag per page: the tables are spliced
  in after the tile's SOI;
- TIFF photometric RGB (Aperio SVS, usually): the JPEG holds R, G, B directly, with no
  marker saying so, and a decoder would treat it as YCbCr (wrong colours). An Adobe APP14
  marker with transform 0 tells the decoder "no colour transform".

Whole self-contained streams (tifffile writes these) pass through untouched, apart from
the APP14 marker when the page is RGB.

DALI is imported when a decoder is built, not with this module, so hosts without DALI
(macOS, for instance) can still import the pipeline and read through OpenSlide.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence

import numpy as np

from engines.errors import BackendUnavailableError

logger = logging.getLogger(__name__)

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
# APP14 "Adobe", version 100, flags0 0, flags1 0, transform 0 (= no colour transform: RGB).
_ADOBE_APP14_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

DEVICES = ("cpu", "mixed")


class JpegDecodeError(RuntimeError):
    """A batch of JPEG streams could not be decoded (the reader adds where on the slide).

    Attributes:
        sample: index (in the list given to `decode`) of the stream that failed, if known.
    """

    def __init__(self, message: str, sample: int | None = None) -> None:
        super().__init__(message)
        self.sample = sample


def jpeg_stream(tile: bytes, tables: bytes | None = None, rgb: bool = False) -> bytes:
    """Make one tile's bytes from a TIFF into a complete, decodable JPEG stream.

    Args:
        tile: the tile's bytes as stored (starts with SOI).
        tables: the page's JPEGTables tag (SOI, DQT/DHT segments, EOI), or None.
        rgb: the page's photometric is RGB (the JPEG components are R, G, B).

    Returns:
        SOI [+ APP14 transform 0] [+ tables without SOI/EOI] + the tile after its SOI.

    Raises:
        ValueError: `tile` does not start with a JPEG SOI marker.
    """
    if tile[:2] != _SOI:
        raise ValueError("tile is not a JPEG stream (no SOI marker)")
    if tables is None and not rgb:
        return tile
    parts = [_SOI]
    if rgb:
        parts.append(_ADOBE_APP14_RGB)
    if tables:
        body = tables[2:] if tables[:2] == _SOI else tables
        parts.append(body[:-2] if body[-2:] == _EOI else body)
    parts.append(tile[2:])
    return b"".join(parts)


def cuda_device_count() -> int:
    """Number of CUDA devices DALI can use; 0 without DALI, a driver or a GPU."""
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
    except ImportError:
        return 0
    try:
        return int(GetCUDADeviceCount())
    except Exception:  # noqa: BLE001 - no driver raises a bare RuntimeError
        return 0


def default_device() -> str:
    """`"mixed"` (GPU decoding) where a CUDA device exists, else `"cpu"`."""
    return "mixed" if cuda_device_count() > 0 else "cpu"


def dali_available() -> bool:
    """Whether DALI can be imported here."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class JpegDecoder:
    """Decodes batches of JPEG streams to RGB with one DALI pipeline.

    The pipeline is built once: an external source feeding `fn.decoders.image`, on the
    CPU (`device="cpu"`, libjpeg-turbo) or on the GPU (`device="mixed"`, nvJPEG). Results
    always come back as host arrays. `decode` may be called from several threads; calls
    are serialised (a DALI pipeline runs one batch at a time), and DALI's own threads
    decode the images of a batch in parallel.

    Args:
        device: `"cpu"` or `"mixed"`.
        max_batch: most streams per DALI run; longer inputs are split.
        num_threads: DALI CPU threads.
        device_id: CUDA device for `"mixed"` (default 0); ignored for `"cpu"`.

    Raises:
        BackendUnavailableError: DALI is not installed, or `"mixed"` without a GPU.
        ValueError: unknown device or bad sizes.
    """

    def __init__(
        self,
        device: str = "cpu",
        max_batch: int = 64,
        num_threads: int = 2,
        device_id: int | None = None,
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if max_batch < 1 or num_threads < 1:
            raise ValueError("max_batch and num_threads must be >= 1")
        if not dali_available():
            raise BackendUnavailableError(
                "NVIDIA DALI is not installed; install nvidia-dali-cuda130 or read with OpenSlide."
            )
        if device == "mixed" and cuda_device_count() == 0:
            raise BackendUnavailableError("GPU decoding needs a CUDA GPU, and none is visible.")
        self.device = device
        self.max_batch = max_batch
        self._num_threads = num_threads
        self._device_id = (0 if device_id is None else device_id) if device == "mixed" else None
        self._lock = threading.Lock()
        self._pipe = self._build()

    @property
    def name(self) -> str:
        """`"dali-cpu"` or `"dali-gpu"`."""
        return "dali-gpu" if self.device == "mixed" else "dali-cpu"

    def _build(self):  # -> nvidia.dali.Pipeline
        from nvidia.dali import fn, pipeline_def, types

        device = self.device

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self._num_threads,
            device_id=self._device_id,
            prefetch_queue_depth=1,
        )
        def jpeg_pipeline():  # type: ignore[no-untyped-def]
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device=device, output_type=types.RGB)

        pipe = jpeg_pipeline()
        pipe.build()
        return pipe

    def decode(self, streams: Sequence[bytes | np.ndarray]) -> list[np.ndarray]:
        """Decode JPEG streams.

        Args:
            streams: complete JPEG streams (see `jpeg_stream`).

        Returns:
            One (height, width, 3) uint8 RGB array per stream, in order.

        Raises:
            JpegDecodeError: DALI failed on the batch (corrupt data, unsupported JPEG);
                its `sample` is the first stream that fails on its own.
        """
        arrays = [
            s if isinstance(s, np.ndarray) else np.frombuffer(s, dtype=np.uint8) for s in streams
        ]
        out: list[np.ndarray] = []
        with self._lock:
            for start in range(0, len(arrays), self.max_batch):
                out.extend(self._run(arrays[start : start + self.max_batch], start))
        return out

    def _run(self, batch: list[np.ndarray], start: int) -> list[np.ndarray]:
        if self._pipe is None:
            raise JpegDecodeError("the decoder is closed")
        try:
            self._pipe.feed_input("encoded", batch)
            (images,) = self._pipe.run()
            if self.device == "mixed":
                images = images.as_cpu()
            return [np.array(images.at(i), copy=True) for i in range(len(batch))]
        except Exception as exc:
            # DALI says "Current pipeline object is no longer valid" after a failed run.
            self._pipe = self._build()
            found = re.search(r"Failed to decode sample #(\d+)", str(exc))
            if found or len(batch) == 1:
                sample = start + (int(found.group(1)) if found else 0)
                raise JpegDecodeError(f"stream {sample} is not valid JPEG", sample) from exc
            # Some DALI versions do not say which sample failed: find it one at a time.
            for i, one in enumerate(batch):
                self._run([one], start + i)
            raise JpegDecodeError(f"DALI failed on a batch of {len(batch)} streams") from exc

    def close(self) -> None:
        """Release the pipeline (and its device memory)."""
        with self._lock:
            self._pipe = None
