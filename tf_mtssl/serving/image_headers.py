"""How many pixels an encoded image decodes to, read from its header alone (no decoding).

The server refuses an image over its pixel limit before `tf.io.decode_image` runs: a 186 KB PNG can
state 8000x8000 and would cost 183 MB to decode. Every format that decode_image accepts is covered:
JPEG (tf.image.extract_jpeg_shape), PNG (IHDR), GIF (every frame: giflib decodes them all), BMP,
WebP (every frame of an animation) and JPEG XL, whose size is not read here and which is refused.
"""

import struct
from typing import NamedTuple, Optional

import tensorflow as tf

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIF_MAGICS = (b"GIF87a", b"GIF89a")
JXL_MAGICS = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")  # codestream, ISO BMFF container


class ImageSize(NamedTuple):
  """The pixels decoding allocates (frames included) and a description such as 'PNG 8000x8000'."""
  pixels: int
  description: str


def _size(kind: str, width: int, height: int, frames: int = 1, pixels: Optional[int] = None) -> ImageSize:
  text = f"{kind} {width}x{height}" + (f" ({frames} frames)" if frames > 1 else "")
  return ImageSize(width * height * frames if pixels is None else pixels, text)


def _gif(data: bytes) -> Optional[ImageSize]:
  """Walks the GIF blocks: the canvas and the sum of every frame's area (giflib's DGifSlurp decodes
  every frame, also when only the first is kept)."""
  width, height, packed = struct.unpack_from("<HHB", data, 6)
  pos = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)  # after the global colour table
  frames = frame_pixels = max_w = max_h = 0
  while pos < len(data):
    block = data[pos]
    if block == 0x3B:  # trailer
      break
    if block == 0x2C:  # image descriptor
      w, h, packed = struct.unpack_from("<HHB", data, pos + 5)
      frames, frame_pixels = frames + 1, frame_pixels + w * h
      max_w, max_h = max(max_w, w), max(max_h, h)
      pos += 10 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0) + 1  # + LZW minimum code size
    elif block == 0x21:  # extension: label, then sub-blocks
      pos += 2
    else:
      return None
    while pos < len(data) and data[pos]:  # data sub-blocks up to the empty one
      pos += data[pos] + 1
    pos += 1
  width, height = max(width, max_w), max(height, max_h)  # TF's canvas: the largest frame
  return _size("GIF", width, height, frames=max(frames, 1), pixels=max(width * height, frame_pixels))


def _webp(data: bytes) -> Optional[ImageSize]:
  fourcc = data[12:16]
  if fourcc == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
    width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", data, 26))
    return _size("WebP", width, height)
  if fourcc == b"VP8L":  # lossless: 14-bit (size - 1) fields after the signature byte
    bits = int.from_bytes(data[21:25], "little")
    return _size("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
  if fourcc == b"VP8X":  # extended: 24-bit (canvas size - 1); animations count every frame
    width = int.from_bytes(data[24:27], "little") + 1
    height = int.from_bytes(data[27:30], "little") + 1
    frames, pos = 0, 12
    while pos + 8 <= len(data):
      tag, length = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
      frames += tag == b"ANMF"
      pos += 8 + length + (length & 1)
    return _size("WebP", width, height, frames=max(frames, 1))
  return None


def decoded_size(data: bytes) -> Optional[ImageSize]:
  """The size `data` decodes to, from its header; None when the format is not an image format or
  the header is unreadable (decoding then fails at once, allocating nothing).

  Raises ValueError for JPEG XL, whose size this module does not read.
  """
  try:
    if data.startswith(JPEG_MAGIC):
      height, width = (int(v) for v in tf.image.extract_jpeg_shape(data, output_type=tf.int64)[:2])
      return _size("JPEG", width, height)
    if data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR":
      width, height = struct.unpack_from(">II", data, 16)
      return _size("PNG", width, height)
    if data.startswith(GIF_MAGICS):
      return _gif(data)
    if data.startswith(b"BM"):  # BITMAPCOREHEADER (12 bytes) has 16-bit sizes, later ones 32-bit
      header = struct.unpack_from("<I", data, 14)[0]
      width, height = struct.unpack_from("<HH" if header == 12 else "<ii", data, 18)
      return _size("BMP", abs(width), abs(height))
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
      return _webp(data)
  except (struct.error, IndexError, tf.errors.InvalidArgumentError):
    return None
  if data.startswith(JXL_MAGICS):
    raise ValueError("is a JPEG XL image, whose size is not checked before decoding; send JPEG, PNG, "
                     "GIF, BMP or WebP")
  return None
