"""Captions of the shapes domain: made from fields, parsed back, checked against objects.

A caption is one of four kinds, each object a `[size] color shape`:

  single    "a red circle", "a large blue square"
  count     "three yellow stars"            (2 to 4 objects of one color and shape)
  binding   "a red circle and a blue square"
  relation  "a red circle to the left of a blue square"   (also right of, above, below)

`format_caption` and `parse_caption` are inverses; `caption_matches` checks parsed fields
against any objects (a scene's, or those a detector finds), with the caller's test of what a
relation means in pixels.
"""

from parti_jax.shapes.vocabulary import COLORS, NUMBERS, PLURALS, RELATIONS, SHAPES, SIZES


def _phrase(obj: dict, article: bool = True) -> str:
  words = ([obj["size"]] if "size" in obj else []) + [obj["color"], obj["shape"]]
  if article:
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
  return " ".join(words)


def format_caption(fields: dict) -> str:
  """The caption of `fields` (a scene's "caption_fields"); `parse_caption` inverts it."""
  kind, objs = fields["kind"], fields["objects"]
  if kind == "single":
    return _phrase(objs[0])
  if kind == "count":
    *head, shape = _phrase(objs[0], article=False).split()
    return " ".join([NUMBERS[fields["count"]], *head, PLURALS[shape]])
  if kind == "binding":
    return f"{_phrase(objs[0])} and {_phrase(objs[1])}"
  if kind == "relation":
    return f"{_phrase(objs[0])} {RELATIONS[fields['relation']]} {_phrase(objs[1])}"
  raise ValueError(f"unknown caption kind {kind!r}")


def _parse_object(words: list[str], i: int, nouns) -> tuple[dict, int]:
  """One `[size] color shape` at words[i:]; returns (object, index after it)."""
  obj = {}
  if i < len(words) and words[i] in SIZES:
    obj["size"] = words[i]
    i += 1
  if i + 1 >= len(words):
    raise ValueError("caption ends inside an object")
  if words[i] not in COLORS or words[i + 1] not in nouns:
    raise ValueError(f"expected a color and a shape at {' '.join(words[i:i + 2])!r}")
  obj["color"], obj["shape"] = words[i], nouns[words[i + 1]]
  # Keys in caption order; dicts compare equal regardless, this only keeps printouts tidy.
  return {k: obj[k] for k in ("size", "color", "shape") if k in obj}, i + 2


def parse_caption(caption: str) -> dict:
  """A caption of the shapes grammar -> its fields; raises ValueError for anything else.

  Fields: kind; objects, a list of {"color", "shape"[, "size"]} ("size" only where the
  caption names it; one object for a count); "count" for counts; "relation" for relations.
  """
  words = caption.split()
  singular = {s: s for s in SHAPES}
  try:
    if words and words[0] in NUMBERS.values():
      count = next(n for n, w in NUMBERS.items() if w == words[0])
      obj, i = _parse_object(words, 1, {p: s for s, p in PLURALS.items()})
      fields = {"kind": "count", "count": count, "objects": [obj]}
    else:
      if not words or words[0] not in ("a", "an"):
        raise ValueError("expected 'a' or 'an' or a number word")
      first, i = _parse_object(words, 1, singular)
      fields = {"kind": "single", "objects": [first]}
      if i < len(words):
        fields, i = _parse_second(words, i, first, singular)
    if i != len(words):
      raise ValueError(f"unexpected words {' '.join(words[i:])!r}")
  except IndexError:
    raise ValueError(f"caption {caption!r} ends early") from None
  except ValueError as e:
    raise ValueError(f"caption {caption!r} is not in the shapes grammar: {e}") from None
  return fields


def _parse_second(words, i, first, singular) -> tuple[dict, int]:
  """The rest of a binding ("and a ...") or relation ("above a ...") caption."""
  if words[i] == "and":
    kind, relation, i = "binding", None, i + 1
  else:
    kind = "relation"
    relation = next((r for r, phrase in RELATIONS.items()
                     if words[i:i + len(phrase.split())] == phrase.split()), None)
    if relation is None:
      raise ValueError(f"expected 'and' or a relation at {words[i]!r}")
    i += len(RELATIONS[relation].split())
  if words[i] not in ("a", "an"):
    raise ValueError(f"expected 'a' or 'an' at {words[i]!r}")
  second, i = _parse_object(words, i + 1, singular)
  fields = {"kind": kind, "objects": [first, second]}
  if relation:
    fields["relation"] = relation
  return fields, i


def _describes(desc: dict, obj: dict) -> bool:
  return all(obj[k] == v for k, v in desc.items())


def caption_matches(fields: dict, objects: list[dict], relation_test) -> bool:
  """Whether `objects` are exactly what parsed caption `fields` asks for: no object missing
  or extra, each as described, and `relation_test(a, b, relation)` for a relation."""
  descs = fields["objects"]
  if fields["kind"] == "single":
    return len(objects) == 1 and _describes(descs[0], objects[0])
  if fields["kind"] == "count":
    return len(objects) == fields["count"] and all(_describes(descs[0], o) for o in objects)
  if len(objects) != 2:
    return False
  return any(_describes(descs[0], a) and _describes(descs[1], b) and (
      fields["kind"] == "binding" or relation_test(a, b, fields["relation"]))
      for a, b in (objects, objects[::-1]))
