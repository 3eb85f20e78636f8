"""The tfds source: a prepared TFDS split as raw image-text records, without TensorFlow.

`tfds.data_source` reads TFDS datasets prepared in array_record format. Image features are
read with SkipDecoding, so records keep the stored encoded bytes (TFDS would otherwise
need TensorFlow, or decode only to have ingest re-encode); uint8 Tensor features arrive
as arrays. Ingest writes these records into shards (`plan`); the grain pipeline can read
them directly through `TfdsRecords` (`config.data.train = "tfds:NAME/SPLIT"`). A record's
id is its element's index in the split.
"""

import numpy as np

from parti_jax.data import records, sources
from parti_jax.data.records import DataError


def plan(name, data_dir, split, image_feature, caption_feature, num_shards) -> sources.Plan:
  """The split's elements in K shards: by default one per 10,000 elements."""
  source = TfdsRecords(name, data_dir, split, image_feature, caption_feature)
  n = len(source)
  k = num_shards or sources.default_num_shards(n)

  def jobs(shard, errors):
    del errors
    for i in sources.shard_range(shard, n, k):
      yield str(i), lambda i=i: records.as_record(source[i])

  made_by = {"source": "tfds", "paths": [sources.absolute(data_dir)] if data_dir else [],
             "tfds_name": name, "split": split, "image_feature": image_feature,
             "caption_feature": caption_feature}
  fingerprint = sources.fingerprint_of("tfds", name, split, n, image_feature, caption_feature, k)
  return sources.Plan("tfds", n, k, fingerprint, made_by, jobs,
                      lambda s: len(sources.shard_range(s, n, k)))


def tfds_element_to_record(element: dict, index: int, image_feature: str,
                           caption_feature: str) -> dict:
  """A TFDS element (as `tfds.data_source` returns it) -> dict(id, image, captions).

  `image` is the stored encoded bytes (an Image feature read with SkipDecoding), or a
  uint8 array as stored (a Tensor feature; `images.open_image` converts it); None if
  absent. `captions` is a list of str or bytes as stored; clean them with
  `spm.clean_caption`. Features may be nested: "a/b" is element["a"]["b"].
  """
  image = _lookup(element, image_feature)
  if isinstance(image, np.ndarray) and image.dtype.kind in "OSV":
    image = image.item() if image.size == 1 else None
  captions = _text_values(_lookup(element, caption_feature))
  return {"id": str(index), "image": image, "captions": captions}


def _lookup(element, path: str):
  for part in path.split("/"):
    if not isinstance(element, dict) or part not in element:
      return None
    element = element[part]
  return element


def _text_values(value) -> list:
  """A caption feature's value (str, bytes, or a sequence or array of them) as a list."""
  if value is None:
    return []
  if isinstance(value, (str, bytes)):  # np.str_ and np.bytes_ included
    return [value]
  if isinstance(value, np.ndarray):
    value = value.ravel().tolist()
  if isinstance(value, (list, tuple)):
    return [v for item in value for v in _text_values(item)]
  return []


class TfdsRecords:
  """Random access to a prepared TFDS split as raw records (see `tfds_element_to_record`).

  Picklable, so grain worker processes can hold it. An element that cannot be read
  becomes a record without image or captions, which the consumer counts as bad.
  """

  def __init__(self, name: str, data_dir, split: str, image_feature: str, caption_feature: str):
    self.name, self.data_dir, self.split = name, data_dir, split
    self.image_feature, self.caption_feature = image_feature, caption_feature
    features = _tfds_features(name, data_dir, image_feature, caption_feature)
    self.source = _tfds_source(name, data_dir, split, image_feature, features)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    try:
      element = self.source[index]
    except Exception as e:  # noqa: BLE001  a corrupt element must not stop the reader
      return {"id": str(index), "image": None, "captions": [],
              "error": f"{type(e).__name__}: {e}"}
    return tfds_element_to_record(element, index, self.image_feature, self.caption_feature)


def _tfds_features(name, data_dir, image_feature, caption_feature):
  """The named features' specs; a clear DataError when a name or its type is wrong."""
  import tensorflow_datasets as tfds  # imported only here: TFDS is slow to import
  try:
    features = tfds.builder(name, data_dir=data_dir).info.features
  except Exception as e:  # noqa: BLE001  TFDS raises many types; its text lists every dataset
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"cannot open TFDS dataset {name!r} in "
                    f"{data_dir or 'the default data_dir'}: {first}") from None
  available = f"available: {', '.join(_feature_names(features))}"
  specs = {}
  for role, path in (("image", image_feature), ("caption", caption_feature)):
    specs[role] = _feature_at(features, path)
    if specs[role] is None:
      raise DataError(f"TFDS dataset {name!r} has no feature {path!r} (--{role}_feature); "
                      f"{available}")
  if not (isinstance(specs["image"], tfds.features.Image) or _is_uint8_tensor(specs["image"])):
    raise DataError(f"TFDS feature {image_feature!r} is {_describe(specs['image'])}, not an "
                    f"Image or a uint8 Tensor; {available}")
  if not _is_text(specs["caption"]):
    raise DataError(f"TFDS feature {caption_feature!r} is {_describe(specs['caption'])}, not "
                    f"text; {available}")
  return features


def _describe(spec) -> str:
  return repr(spec).splitlines()[0].rstrip("({")


def _tfds_source(name, data_dir, split, image_feature, features):
  import tensorflow_datasets as tfds
  decoders = None
  if isinstance(_feature_at(features, image_feature), tfds.features.Image):
    # The stored encoded bytes are what a shard keeps; decoding them here would be wasted.
    decoders = tfds.decode.SkipDecoding()
    for part in reversed(image_feature.split("/")):
      decoders = {part: decoders}
  try:
    return tfds.data_source(name, data_dir=data_dir, split=split, decoders=decoders)
  except Exception as e:  # noqa: BLE001  TFDS raises many types for an unprepared split
    raise DataError(f"cannot read TFDS {name!r} split {split!r} from "
                    f"{data_dir or 'the default data_dir'} ({type(e).__name__}: {e}); it must "
                    "be prepared with file_format='array_record'") from None


def _feature_at(features, path: str):
  spec = features
  for part in path.split("/"):
    spec = getattr(spec, "feature", spec)  # step through a Sequence to what it holds
    if not hasattr(spec, "keys") or part not in spec:
      return None
    spec = spec[part]
  return spec


def _feature_names(features, prefix: str = "") -> list[str]:
  names = []
  for key in features:
    spec = features[key]
    inner = getattr(spec, "feature", spec)
    names += ([f"{prefix}{key}"] + _feature_names(inner, f"{prefix}{key}/")
              if hasattr(inner, "keys") else [f"{prefix}{key}"])
  return names


def _is_uint8_tensor(spec) -> bool:
  shape = getattr(spec, "shape", None)
  return (getattr(spec, "np_dtype", None) == np.uint8 and isinstance(shape, tuple)
          and len(shape) in (2, 3))


def _is_text(spec) -> bool:
  while hasattr(spec, "feature"):  # Sequence(Text()) and nested sequences hold captions
    spec = spec.feature
  try:
    return np.dtype(spec.np_dtype).kind in "OSU"
  except (AttributeError, TypeError):
    return False
