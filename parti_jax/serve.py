"""A web page for sampling a Parti run or model folder, and its JSON API (Gradio).

  python -m parti_jax.serve (--workdir RUN [--step N|best] | --model FOLDER) \\
      [--host 127.0.0.1 --port 7860] \\
      [--max_images 16 --batch_sizes 4,16,32 --batch_wait_ms 100 --max_users 16 \\
       --queue_size 32 --sjd_window 16] [--rerank RERANKER_RUN] [--upsample UPSAMPLER_RUN]

Open http://HOST:PORT: type one or more prompts (one a line), set the number of images,
seed, guidance, temperature, top-k, top-p and speculative decoding, press Generate; the
grid fills in as decodes finish, each image with its prompt, seed and sample index, a
download button, and a link (URL query parameters) that draws it again. With `--rerank`
the page offers "keep the best K": each prompt's images are scored against it by the
contrastive reranker and only the K best are shown, best first, with their scores; with
`--upsample` the images come upsampled by the super-resolution run. Scripts call the
same thing through Gradio's client (`gradio_client.Client(URL).predict(..., api_name=
"/generate")`; docs/serve.md).

Requests decoding at the same time share decodes (parti_jax/batcher.py): up to
--max_users requests are taken at once, and their rows of the same settings go into one
program of up to the largest --batch_sizes rows, after waiting up to --batch_wait_ms for
more. Gradio's own batching (`batch=True`) is not used: it refuses generator functions,
so no grid could fill in, and gives batched events no progress bar. More than
--queue_size waiting requests get Gradio's "Queue is full! Please try again." Settings
are compiled into the sampler: the default ones at start, others on first use.

A sample's image depends only on its prompt, seed and index, as with `python -m
parti_jax.sample` (parti_jax/sampling.py): alone or batched, it is the same image.
"""

import atexit
import itertools
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np
from etils import epath
from PIL import Image

from parti_jax import batcher as batcher_lib
from parti_jax import cli, decoding, rerank, runs, sampling, web
from parti_jax import text as text_lib
from parti_jax.data import records

DEFAULTS = decoding.Settings()
FLAGS = cli.Flags(__doc__)
sampling.define_model_flags(FLAGS)
sampling.define_helper_flags(FLAGS)
FLAGS.string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
FLAGS.integer("port", 7860, "Port to listen on.")
FLAGS.integer("max_images", 16, "Most images one request may ask (prompts x images).")
FLAGS.string("batch_sizes", "4,16,32", "Rows per decode the sampler is compiled for, "
             "comma-separated (rounded up to the devices); the largest is the most one "
             "decode takes.")
FLAGS.integer("batch_wait_ms", 100, "How long a request waits for others to share its "
              "decode.")
FLAGS.integer("max_users", 16, "Requests decoding at once (Gradio's concurrency limit).")
FLAGS.integer("queue_size", 32, "Requests waiting beyond those; more are told to retry.")
FLAGS.integer("sjd_window", 16, "Draft tokens per forward when speculative decoding is on.")
FLAGS.bool("warmup", True, "Compile the default settings before serving.")

RESULT_TIMEOUT_S = 900  # a decode that long has hung: the request is told, not left waiting
FILE_ROUTE = "/gradio_api/file="  # Gradio's URL of a file it serves: FILE_ROUTE + path


def log(message: str) -> None:
  # One write per line: requests log from several threads at once.
  sys.stderr.write(f"{time.strftime('%H:%M:%S')} serve: {message}\n")
  sys.stderr.flush()


def image_folder() -> epath.Path:
  """Where the server writes its PNGs, one folder a request, each file written once and
  never rewritten (Gradio rewrites a numpy image's file in place each time it is output,
  and a second request for the same image then truncated the file while the first one's
  download read it). A static path: Gradio sends them from here as they are, instead of
  hashing and copying every image into its cache on each request. A request's folder
  goes a day later, all of them when the server exits."""
  import gradio as gr
  files = epath.Path(tempfile.mkdtemp(prefix="parti_jax_serve_"))
  gr.set_static_paths([str(files)])
  _remove_old_folders(files, every_s=3600, age_s=86400)
  atexit.register(shutil.rmtree, files, ignore_errors=True)
  return files


class ImageFiles:
  """ASGI middleware: a GET of one of the server's own PNGs (Gradio's URL for it,
  `.../gradio_api/file=PATH` with PATH in `folder`) is answered from the file at once.
  Gradio's route hands each file to a worker thread to check a login (the server has
  none), then to four more to stat, open, read and close it; for 8 users' 32 images those
  hand-offs, each waiting for the GIL on a busy CPU, took 0.1 s of the users' time and
  the largest share of the server's Python time. Anything else, a HEAD or Range request
  or a missing file, goes to Gradio."""

  def __init__(self, app, folder: str):
    self.app, self.folder = app, os.path.realpath(folder) + os.sep

  async def __call__(self, scope, receive, send):
    image = self._image(scope)
    if image is None:
      return await self.app(scope, receive, send)
    name, body = image
    await send(dict(type="http.response.start", status=200, headers=[
        (b"content-type", b"image/png"), (b"content-length", str(len(body)).encode()),
        (b"content-disposition", f'inline; filename="{name}"'.encode())]))
    await send(dict(type="http.response.body", body=body))

  def _image(self, scope) -> tuple[str, bytes] | None:
    if scope["type"] != "http" or scope["method"] != "GET" or any(
        key == b"range" for key, _ in scope["headers"]):
      return None
    at = scope["path"].find(FILE_ROUTE)
    path = os.path.realpath(scope["path"][at + len(FILE_ROUTE):]) if at >= 0 else ""
    if not (path.startswith(self.folder) and path.endswith(".png")):
      return None
    try:
      with open(path, "rb") as f:  # a small file, just written: read here, no thread
        return os.path.basename(path), f.read()
    except OSError:
      return None


def build(run: sampling.Run, batcher: batcher_lib.Batcher, limits: web.Limits,
          sjd_window: int, max_users: int, files: epath.Path, scorer=None, upsampler=None):
  """The Gradio page and its /generate API (`files`: image_folder(); `scorer`,
  `upsampler`: parti_jax.rerank.Scorer and parti_jax.upsample.Upsampler, or None)."""
  import gradio as gr

  requests = itertools.count(1)
  text_len = run.setup.config.model.text_len

  def rows_of(r: web.Request) -> list[batcher_lib.Row]:
    rows = []
    for prompt in r.prompts:
      text = text_lib.pad(run.text_tokenizer.ids(prompt), text_len)
      rows += [batcher_lib.Row(text, decoding.prompt_id(prompt), r.seed, r.start + s)
               for s in range(r.num_images)]
    return rows

  def generate(prompts, num_images, seed, start, guidance, temperature, top_k, top_p, sjd,
               keep, upsample, request: gr.Request, progress=gr.Progress()):
    number, began = next(requests), time.perf_counter()
    fields = dict(zip(web.FIELDS, (prompts, num_images, seed, start, guidance, temperature,
                                   top_k, top_p, sjd, keep, upsample)))
    try:
      r = web.parse(fields, limits, run.text_tokenizer, sjd_window)
    except web.RequestError as e:
      log(f"request {number}: refused: {e}")
      raise gr.Error(str(e), title="Cannot draw that") from None
    for warning in r.warnings:
      gr.Warning(warning)
    rows = rows_of(r)
    s = r.settings
    log(f"request {number} from {request.client.host if request.client else '?'}: "
        f"{len(r.prompts)} prompts x {r.num_images} images, seed {r.seed}, start {r.start}, "
        f"guidance {s.guidance}, temperature {s.temperature}, top_k {s.top_k}, top_p "
        f"{s.top_p}, sjd {r.sjd}, keep {r.keep}, upsample {r.upsample}; "
        f"{batcher.waiting_rows()} rows already waiting")
    job = batcher.submit(s, rows)
    images, batches, entries = [None] * len(rows), [], list(_entries(r))
    pixels, scores = [None] * len(rows), None
    folder = files / f"request_{number}"
    folder.mkdir()
    progress(0, desc=f"waiting to decode {len(rows)} images")
    try:
      for indices, pictures, report in job.finished(RESULT_TIMEOUT_S):
        if r.upsample and not r.keep:  # with keep, only the kept ones, at the end
          pictures = upsampler(pictures)
        for i, picture in zip(indices, pictures):
          pixels[i] = picture
          images[i] = _save(folder, entries[i], r.seed, picture)
        batches.append(report)
        done = sum(x is not None for x in images)
        progress(done / len(rows), desc=f"{done} of {len(rows)} images")
        if done == len(rows) and r.keep:
          progress(1, desc=f"ranking {len(rows)} images")
          scores = scorer.scores(np.stack(pixels), [prompt for _, prompt, _ in entries])
          shown = _best(r, scores)
          if r.upsample:
            for i, picture in zip(shown, upsampler(np.stack([pixels[i] for i in shown]))):
              images[i] = _save(folder, entries[i], r.seed, picture)
        else:
          shown = [i for i, _, _ in entries if images[i] is not None]
        grid = [(images[i], _caption(entries[i], r.seed, scores)) for i in shown]
        yield sent(grid, _status(r, rows, images, batches, scores),
                   _details(r, rows, images, batches, number, scores))
    except Exception as e:  # noqa: BLE001  a failed decode or none in time: said, not hung
      message = str(e) or f"no images after {RESULT_TIMEOUT_S} s"
      log(f"request {number}: failed: {message}")
      raise gr.Error(message, title="Decoding failed") from None
    log(f"request {number}: {len(rows)} images in {time.perf_counter() - began:.2f} s; "
        "decodes " + ", ".join(f"{b.number} ({b.rows} rows of {b.requests} requests, "
                               f"{b.decode_s:.2f} s)" for b in batches))

  def sent(grid, status_text, details_value):
    # The events skip Gradio's pre- and post-processing (preprocess=False,
    # postprocess=False): web.parse checks the fields as sent, and the outputs are put in
    # the form Gradio sends by the components' own postprocess, here in the generator's
    # thread, where Gradio would hand each input and output to a worker thread of its
    # own (on a busy 2-core CPU each hand-off waits for the GIL).
    return [_dumped(component.postprocess(value)) for component, value in
            ((gallery, grid), (status, status_text), (details, details_value))]

  defaults = dict(prompts="", num_images=4, seed=0, start=0, guidance=DEFAULTS.guidance,
                  temperature=DEFAULTS.temperature, top_k=DEFAULTS.top_k,
                  top_p=DEFAULTS.top_p, sjd=False, keep=0, upsample=upsampler is not None)

  # Gradio's cache of served images: emptied of files older than a day, every hour.
  with gr.Blocks(title="parti_jax", analytics_enabled=False, delete_cache=(3600, 86400)) as page:
    gr.Markdown(f"## parti_jax · {epath.Path(run.workdir).name}, step {run.step}\nOne "
                f"prompt a line. Up to "
                f"{limits.max_images} images a request; a prompt is read up to {text_len} "
                "text tokens.")
    with gr.Row():
      prompts = gr.Textbox(label="Prompts", lines=3, placeholder="a red circle above a blue "
                           "square", elem_id="prompts", scale=4)
      go = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
    with gr.Row():
      num_images = gr.Number(defaults["num_images"], label="Images per prompt",
                             info=f"1 to {limits.max_images}", elem_id="num_images")
      seed = gr.Number(defaults["seed"], label="Seed", info=f"0 to {web.MAX_SEED}",
                       elem_id="seed")
      start = gr.Number(defaults["start"], label="First sample", info="sample indices "
                        "start here", elem_id="start")
    with gr.Row():
      guidance = gr.Number(defaults["guidance"], label="Guidance", info="0 to 20; 1: none",
                           elem_id="guidance")
      temperature = gr.Number(defaults["temperature"], label="Temperature",
                              info="0 (greedy) to 10", elem_id="temperature")
      top_k = gr.Number(defaults["top_k"], label="Top-k",
                        info=f"0 (all) to {limits.codebook_size}", elem_id="top_k")
      top_p = gr.Number(defaults["top_p"], label="Top-p", info="above 0 to 1 (all)",
                        elem_id="top_p")
      sjd = gr.Checkbox(defaults["sjd"], label="Speculative decoding",
                        info=f"{sjd_window} drafts a forward", elem_id="sjd")
    with gr.Row(visible=scorer is not None or upsampler is not None):
      keep = gr.Number(defaults["keep"], label="Keep the best", visible=scorer is not None,
                       info="of each prompt's images, by the reranker (0: all, ranked only "
                       "when kept)", elem_id="keep")
      upsample = gr.Checkbox(defaults["upsample"], label="Upsample",
                             visible=upsampler is not None,
                             info=f"x{upsampler.scale if upsampler else 1} by the "
                             "super-resolution model", elem_id="upsample")
    gallery = gr.Gallery(label="Images", format="png", columns=4, height="auto",
                         buttons=["download", "fullscreen"], elem_id="gallery")
    status = gr.Markdown(elem_id="status")
    with gr.Accordion("Details (JSON)", open=False):
      details = gr.JSON(elem_id="details")
    inputs = [prompts, num_images, seed, start, guidance, temperature, top_k, top_p, sjd,
              keep, upsample]
    outputs = [gallery, status, details]
    unprocessed = dict(preprocess=False, postprocess=False)  # sent(): why
    go.click(generate, inputs, outputs, api_name="generate", concurrency_limit=max_users,
             concurrency_id="generate", **unprocessed)
    prompts.submit(generate, inputs, outputs, api_visibility="private",
                   concurrency_id="generate", **unprocessed)

    # A link fills the page from its query parameters and draws at once.
    linked = gr.State(False)

    def fill(request: gr.Request):
      query = urllib.parse.parse_qs(str(request.query_params))
      if not query:  # a plain visit: leave the fields be (someone may be typing already)
        return [gr.skip()] * len(web.FIELDS) + [False]
      fields = web.from_query(query, defaults)
      return [fields[name] for name in web.FIELDS] + ["prompt" in query]

    def draw_linked(is_linked, prompts, num_images, seed, start, guidance, temperature, top_k,
                    top_p, sjd, keep, upsample, request: gr.Request, progress=gr.Progress()):
      if not is_linked:
        yield gr.skip(), gr.skip(), gr.skip()
        return
      yield from generate(prompts, num_images, seed, start, guidance, temperature, top_k, top_p,
                          sjd, keep, upsample, request, progress)

    page.load(fill, None, inputs + [linked], api_visibility="private").then(
        draw_linked, [linked, *inputs], outputs, api_visibility="private",
        concurrency_id="generate", **unprocessed)
  return page


def _stop_on_sigterm(signum, frame):
  log("SIGTERM: stopping")
  raise KeyboardInterrupt  # what Gradio's block_thread stops on


def _dumped(value):
  """A component's postprocessed value as Gradio sends it (its models as plain data)."""
  return value.model_dump() if hasattr(value, "model_dump") else value


def _remove_old_folders(files: epath.Path, every_s: float, age_s: float) -> threading.Event:
  """Removes request folders older than `age_s` every `every_s` (as Gradio's delete_cache
  does with its cache): a request's images are downloaded after its answer, so they
  cannot go with it. Setting the returned event stops it."""
  stop = threading.Event()

  def loop():
    while not stop.wait(every_s):
      cutoff = time.time() - age_s
      for folder in files.iterdir():
        if folder.stat().mtime < cutoff:
          shutil.rmtree(folder, ignore_errors=True)

  threading.Thread(target=loop, name="old images", daemon=True).start()
  return stop


def _save(folder: epath.Path, entry, seed: int, picture) -> str:
  """A PNG named for what it shows (the name a download keeps)."""
  _, prompt, sample = entry
  words = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "prompt"
  path = folder / f"{words}_seed{seed}_sample{sample}.png"
  with path.open("wb") as f:
    Image.fromarray(picture).save(f, format="PNG")
  return str(path)


def _best(r: web.Request, scores) -> list[int]:
  """Row indices of each prompt's `r.keep` best-scored images, prompt by prompt, best first
  (ties in sample order)."""
  shown = []
  for p in range(len(r.prompts)):
    rows = np.arange(p * r.num_images, (p + 1) * r.num_images)
    shown += rows[rerank.rank(np.asarray(scores)[rows])][:r.keep].tolist()
  return shown


def _caption(entry, seed: int, scores) -> str:
  i, prompt, sample = entry
  score = "" if scores is None else f", score {scores[i]:.3f}"
  return f"{prompt[:60]} | seed {seed}, sample {sample}{score}"


def _entries(r: web.Request):
  """(row index, prompt, sample index) of every image of a request, in row order."""
  for i, prompt in enumerate(r.prompts):
    for s in range(r.num_images):
      yield i * r.num_images + s, prompt, r.start + s


def _details(r: web.Request, rows, images, batches, number: int, scores=None) -> dict:
  kept = set(_best(r, scores)) if scores is not None else None
  return dict(
      request=number, seed=r.seed, settings=dict(guidance=r.settings.guidance,
                                                 temperature=r.settings.temperature,
                                                 top_k=r.settings.top_k, top_p=r.settings.top_p,
                                                 sjd=r.sjd, keep=r.keep, upsample=r.upsample),
      link=r.link(), warnings=r.warnings,
      images=[dict(prompt=prompt, seed=r.seed, sample=sample, done=images[i] is not None,
                   link=r.link([prompt], sample, 1),
                   **({} if scores is None else dict(score=round(float(scores[i]), 6),
                                                     kept=i in kept)))
              for i, prompt, sample in _entries(r)],
      batches=[dict(number=b.number, rows=b.rows, requests=b.requests, padded_to=b.padded_to,
                    decode_s=round(b.decode_s, 3)) for b in batches])


def _status(r: web.Request, rows, images, batches, scores=None) -> str:
  done = sum(x is not None for x in images)
  lines = [f"**Warning:** {w}" for w in r.warnings]
  if done < len(rows):
    lines.append(f"{done} of {len(rows)} images drawn…")
  else:
    shared = max(b.requests for b in batches)
    lines.append(f"{len(rows)} images drawn in {len(batches)} decode(s)"
                 + (f", shared with up to {shared - 1} other request(s)" if shared > 1 else "")
                 + (f"; the best {r.keep} of each prompt's {r.num_images} kept by the "
                    "reranker" if scores is not None else "")
                 + f". [Link to this request]({r.link()})")
  score = (lambda i: "") if scores is None else (lambda i: f" {scores[i]:.3f} |")
  lines += ["", "| image | prompt | seed | sample | link |" + (" score |" if scores is not None
                                                              else ""),
            "|---|---|---|---|---|" + ("---|" if scores is not None else "")]
  lines += [f"| {i + 1} | {prompt[:60]} | {r.seed} | {sample} | "
            f"[draw again]({r.link([prompt], sample, 1)}) |{score(i)}"
            for i, prompt, sample in _entries(r)]
  return "\n".join(lines)


def main(argv=None):
  a = FLAGS.parse(argv)
  try:
    sampling.check_model_flags(a)
  except sampling.SampleError as e:
    raise SystemExit(f"error: {e}") from None
  try:
    sizes = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise SystemExit(f"error: --batch_sizes {a.batch_sizes!r}: expected positive whole "
                     "numbers, comma-separated")
  for name in ("max_images", "max_users", "queue_size", "sjd_window"):
    if getattr(a, name) < 1:
      raise SystemExit(f"error: --{name} must be at least 1")
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local server phones no one
  # Gradio's queue summarises its last 10,000 events with pandas after every event, for a
  # monitoring page this server does not turn on: 10 ms a request after 200 requests,
  # 20 to 30 ms after 10,000, on the 2-core CPU. Once every 1,000 events instead.
  os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
  try:
    import gradio  # noqa: F401  before the slow load: say it is missing at once
  except ImportError:
    raise SystemExit("error: the web page needs Gradio: pip install -e '.[serve]'") from None
  try:
    scorer, upsampler = sampling.load_helpers(a)  # a wrong run is said before the slow load
    run = sampling.load_flagged(a)
  except (sampling.SampleError, records.DataError, runs.RunError) as e:
    sys.exit(f"error: {e}")
  log(f"loaded {run.workdir} (step {run.step}) in {run.load_s:.1f} s")
  batcher = batcher_lib.Batcher(run, sizes, a.batch_wait_ms / 1000, log)
  if a.warmup:
    log(f"compiled the default settings for batches of {batcher.sizes} in "
        f"{batcher.compile(DEFAULTS):.1f} s")
  limits = web.Limits(a.max_images, batcher.settings_for(DEFAULTS).num_codes
                      or run.setup.config.model.codebook_size, rerank=scorer is not None,
                      upsample=upsampler is not None)
  from starlette.middleware import Middleware
  # A container's or a job scheduler's stop is SIGTERM: from here on (the image folder is
  # made next) stop as on Ctrl-C (Gradio closes the server if it runs, then the folder goes
  # at exit) instead of dying with the folder left behind.
  signal.signal(signal.SIGTERM, _stop_on_sigterm)
  files = image_folder()
  log(f"images go to {files} (removed when the server stops)")
  page = build(run, batcher, limits, a.sjd_window, a.max_users, files, scorer, upsampler)
  page.queue(max_size=a.queue_size, default_concurrency_limit=a.max_users)
  page.launch(server_name=a.host, server_port=a.port, show_error=True, prevent_thread_lock=True,
              quiet=True, ssr_mode=False, max_threads=max(40, 2 * a.max_users + 8),
              # Gradio's run history records every request's images: work per request
              # that a shared server does not need.
              run_history=False,
              # No login (auth=): ImageFiles skips none.
              app_kwargs=dict(middleware=[Middleware(ImageFiles, folder=str(files))]))
  print(f"serving http://{a.host}:{a.port}", flush=True)
  page.block_thread()


if __name__ == "__main__":
  cli.run(main)
