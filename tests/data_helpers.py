"""Real image files of every awkward kind, and small shard sets, for the data tests."""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from parti_jax.data import records, spm


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def rgb(h: int, w: int, seed: int = 0) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def exif_rotated_jpeg() -> bytes:
  """A 40 wide x 20 high JPEG whose EXIF says "rotate 90 degrees": upright it is 20 x 40."""
  img = Image.new("RGB", (40, 20), (255, 0, 0))
  img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 clockwise to view
  return encoded(img, "JPEG", exif=exif.tobytes(), quality=95)


def odd_images() -> dict[str, tuple[bytes, str | None]]:
  """name -> (file bytes, skip reason or None when the image must be converted)."""
  palette = Image.new("P", (12, 12), 0)
  palette.putpalette([10, 200, 30] * 256)
  rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
  good = encoded(rgb(48, 64), "JPEG")
  return {
      "jpeg": (good, None),
      "grayscale_png": (encoded(Image.new("L", (9, 13), 77), "PNG"), None),
      "cmyk_jpeg": (encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), None),
      "rgba_png": (encoded(rgba, "PNG"), None),
      "palette_png_transparent": (encoded(palette, "PNG", transparency=0), None),
      "png_16bit": (encoded(Image.fromarray(np.full((8, 8), 32896, np.uint16)), "PNG"), None),
      "one_pixel_png": (encoded(Image.new("RGB", (1, 1), (0, 255, 0)), "PNG"), None),
      "large_jpeg": (encoded(Image.new("RGB", (6000, 4000), (10, 20, 30)), "JPEG"), None),
      "elongated_png": (encoded(Image.new("RGB", (3000, 2), (9, 9, 9)), "PNG"), None),
      "exif_rotated_jpeg": (exif_rotated_jpeg(), None),
      "zero_bytes": (b"", "missing_image"),
      "truncated_jpeg": (good[:len(good) // 2], "corrupt_image"),
      "garbage": (b"\x00not an image at all" * 10, "corrupt_image"),
  }


CAPTIONS = ["a red circle", "a large blue square", "two green triangles",
            "a red circle to the left of a blue square", "three yellow stars", "a purple heart"]


def odd_captions() -> dict[str, object]:
  return {"empty": "", "whitespace": " \t\n ", "not_utf8": b"caf\xe9 \xff red circle",
          "huge": "red circle " * 1000}


def image_records(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [dict(id=f"img{i}", image=encoded(rgb(int(rng.integers(20, 60)),
                                               int(rng.integers(20, 60)), i), "JPEG"),
               captions=[CAPTIONS[i % len(CAPTIONS)], CAPTIONS[(i + 1) % len(CAPTIONS)]])
          for i in range(n)]


def spm_model(path) -> str:
  words = [f"{c} {s}" for c in "red green blue yellow purple".split()
           for s in "circle square triangles stars heart".split()]
  spm.train(CAPTIONS * 20 + words * 5, path / "spm", vocab_size=64)
  return str(path / "spm.model")


def write_set(path, recs, num_shards=2, kind="images") -> str:
  records.write_shard_set(path, "test", kind, recs, num_shards, made_by={"by": "tests"})
  return str(path)


# A TFDS dataset made in the tests (the name TFDS gives it: "ingest_tiny_captions").

def tfds_png(i: int) -> bytes:
  return encoded(Image.new("RGB", (5 + i, 4), (40 * i, 10, 200)), "PNG")


def tfds_pixels(i: int) -> np.ndarray:
  return np.full((4, 4, 3), 30 * i, np.uint8)


class IngestTinyCaptions(tfds.core.GeneratorBasedBuilder):
  """Six examples; number 3 has an empty caption."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        # Images given as PNG bytes: encoding numpy arrays would need TensorFlow.
        "image": tfds.features.Image(shape=(None, None, 3)),
        "caption": tfds.features.Text(),
        "pixels": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
        "alt": tfds.features.Sequence(tfds.features.Text()),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      yield i, {"image": tfds_png(i), "caption": "" if i == 3 else f"tfds caption {i}",
                "pixels": tfds_pixels(i), "alt": [f"alt {i}", f"other {i}"]}


def prepare_tfds(data_dir):
  """Prepares IngestTinyCaptions in array_record format (no TensorFlow needed)."""
  IngestTinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def token_data(root, num_validation: int = 40):
  """Shapes at 32 px -> SentencePiece -> colour-code token shards (4x4, codebook 64) under
  `root` (tokens/train, tokens/validation, spm.model): what the trainer tests train on."""
  from parti_jax import tokenizers
  from parti_jax.data import encode
  from parti_jax.shapes import dataset, scenes
  dataset.write(root / "shapes", scenes.Spec(), num=256, num_validation=num_validation,
                num_heldout=0, progress=False)
  spm.train(spm.captions_of([root / "shapes" / "train"]), root / "spm", vocab_size=128)
  tokenizer = spm.Tokenizer(root / "spm.model", 16)
  for split in ("train", "validation"):
    encode.encode(root / "shapes" / split, root / "tokens" / split,
                  tokenizers.color(32), tokenizer, batch_size=64)
  return root
