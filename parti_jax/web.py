"""What a request from the sampling page or its API asks for, checked; and links to it.

The page and the JSON API send the same fields as typed, strings included (Gradio's number
boxes pass on whatever they get), so every check lives here and each refusal says which
field is wrong and what it may be. A link is the same fields as URL query parameters:
opening it fills the page and draws the same images.
"""

import dataclasses
import math
import urllib.parse

from parti_jax import decoding
from parti_jax import text as text_lib

MAX_PROMPT_CHARS = 10_000  # the whole prompt box; a prompt's own text is cut to text_len tokens
MAX_SEED = 2 ** 32 - 1  # the key's seed is a uint32
MAX_START = 2 ** 31  # first sample index; sample indices are uint32 too


class RequestError(ValueError):
  """A request that cannot be drawn; the message is shown to the person or script."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """What this server allows per request."""
  max_images: int  # prompts x images per prompt
  codebook_size: int  # top_k's bound
  rerank: bool = False  # whether the server has a reranker (`keep`)
  upsample: bool = False  # whether it has an upsampler (`upsample`)


@dataclasses.dataclass
class Request:
  """A checked request: sample `start + s` (s < num_images) of every prompt."""
  prompts: list[str]
  num_images: int
  seed: int
  start: int
  settings: decoding.Settings
  sjd: bool
  keep: int = 0  # with a reranker: the best of each prompt's images shown (0: all, unscored)
  upsample: bool = False  # images upsampled by the server's upsampler
  warnings: list[str] = dataclasses.field(default_factory=list)

  def link(self, prompts: list[str] | None = None, start: int | None = None,
           num_images: int | None = None) -> str:
    """URL query (`?prompt=...`) that reproduces this request, or one image of it."""
    s = self.settings
    fields = dict(prompt=prompts or self.prompts, n=num_images or self.num_images,
                  seed=self.seed, start=self.start if start is None else start,
                  guidance=s.guidance, temperature=s.temperature, top_k=s.top_k,
                  top_p=s.top_p, sjd=int(self.sjd),
                  # one image's link draws that image, whatever the reranker kept
                  keep=self.keep if num_images is None else 0, upsample=int(self.upsample))
    return "?" + urllib.parse.urlencode(fields, doseq=True)


FIELDS = ("prompts", "num_images", "seed", "start", "guidance", "temperature", "top_k",
          "top_p", "sjd", "keep", "upsample")


def parse(fields: dict, limits: Limits, text_tokenizer, sjd_window: int) -> Request:
  """Checks the page's fields (FIELDS, as sent); truncation of long prompts is a warning."""
  prompts_text = fields["prompts"]
  if not isinstance(prompts_text, str):
    raise RequestError(f"prompts: expected text, one prompt a line; got {prompts_text!r:.80}")
  if len(prompts_text) > MAX_PROMPT_CHARS:
    raise RequestError(f"prompts: {len(prompts_text)} characters; at most {MAX_PROMPT_CHARS}")
  prompts = [line.strip() for line in prompts_text.splitlines() if line.strip()]
  if not prompts:
    raise RequestError("the prompt is empty: type a prompt (one a line for several)")
  num_images = _integer(fields, "num_images", 1, limits.max_images)
  if len(prompts) * num_images > limits.max_images:
    raise RequestError(f"{len(prompts)} prompts x {num_images} images = "
                       f"{len(prompts) * num_images} images; this server draws at most "
                       f"{limits.max_images} per request")
  settings = decoding.Settings(
      guidance=_number(fields, "guidance", 0.0, 20.0),
      temperature=_number(fields, "temperature", 0.0, 10.0),
      top_k=_integer(fields, "top_k", 0, limits.codebook_size),
      top_p=_number(fields, "top_p", 0.0, 1.0, low_open=True),
      sjd_window=sjd_window if _flag(fields, "sjd") else 0)
  keep, upsample = _integer(fields, "keep", 0, num_images), _flag(fields, "upsample")
  if keep and not limits.rerank:
    raise RequestError(f"keep = {keep}: this server has no reranker to choose the best "
                       "(it starts with --rerank RUN); send keep 0")
  if upsample and not limits.upsample:
    raise RequestError("upsample: this server has no upsampler (it starts with --upsample "
                       "RUN); send upsample false")
  request = Request(prompts, num_images, _integer(fields, "seed", 0, MAX_SEED),
                    _integer(fields, "start", 0, MAX_START), settings, bool(settings.sjd_window),
                    keep, upsample)
  for i, prompt in enumerate(prompts):
    ids = text_tokenizer.ids(prompt)
    if ids[-1] != text_lib.END_ID:
      request.warnings.append(
          f"prompt {i + 1} is longer than the model's {text_tokenizer.length} text tokens; "
          f"it reads only {text_tokenizer.decode(ids)!r}")
  return request


def _number(fields, name, low, high, low_open=False) -> float:
  value = fields.get(name)
  if value is None or (isinstance(value, str) and not value.strip()):
    raise RequestError(f"{name} is empty; give a number from {low} to {high}")
  if isinstance(value, bool):
    raise RequestError(f"{name}: expected a number, got {value!r}")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise RequestError(f"{name}: {value!r:.40} is not a number") from None
  if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
    bound = f"above {low}" if low_open else f"from {low}"
    raise RequestError(f"{name} = {value!r:.40} is out of range: {bound} to {high}")
  return number


def _integer(fields, name, low, high) -> int:
  number = _number(fields, name, low, high)
  if number != int(number):
    raise RequestError(f"{name} = {fields[name]!r:.40} is not a whole number")
  return int(number)


def _flag(fields, name) -> bool:
  value = fields.get(name)
  if isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in ("1", "true", "yes", "on"):
    return True
  if text in ("0", "false", "no", "off", "", "none"):
    return False
  raise RequestError(f"{name}: expected true or false, got {value!r:.40}")


def from_query(query: dict[str, list[str]], defaults: dict) -> dict:
  """The page's fields from a link's query parameters (`parse_qs` form); a field the link
  does not name, or names with a value that is not a number, keeps its default."""
  fields = dict(defaults)
  if "prompt" in query:
    fields["prompts"] = "\n".join(query["prompt"])
  names = dict(n="num_images", seed="seed", start="start", guidance="guidance",
               temperature="temperature", top_k="top_k", top_p="top_p", keep="keep")
  for key, field in names.items():
    try:
      fields[field] = float(query[key][-1])
    except (KeyError, ValueError):
      pass
  for name in ("sjd", "upsample"):
    if name in query:
      fields[name] = query[name][-1].strip().lower() in ("1", "true", "yes", "on")
  return fields
