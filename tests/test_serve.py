"""The sampling server through its JSON API: a real server process on a free port, a tiny
trained run (and its model folder), gradio_client requests (concurrent ones too), every
refusal, a full queue."""

import io
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT
from etils import epath
from PIL import Image
from sampling_helpers import tiny_run
from serve_helpers import gallery_pixels, server

from parti_jax import model_folder, serve

gradio_client = pytest.importorskip("gradio_client", reason="pip install -e '.[test]'")
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import QueueError  # noqa: E402
import httpx  # noqa: E402  gradio_client's own HTTP client

MAX_IMAGES = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def served(workdir, tmp_path_factory):
  # A long batch wait, so that requests sent together are surely decoded together.
  with server(workdir, tmp_path_factory.mktemp("serve") / "server.log", "--batch_sizes", "8,32",
              "--batch_wait_ms", "500", "--max_images", str(MAX_IMAGES)) as (url, log):
    yield gradio_client.Client(url, verbose=False), log


def fields(prompts="a red circle", num_images=4, seed=0, start=0, guidance=1.5,
           temperature=0.2, top_k=0, top_p=1.0, sjd=False, keep=0, upsample=False):
  """/generate's inputs, in its order."""
  return [prompts, num_images, seed, start, guidance, temperature, top_k, top_p, sjd, keep,
          upsample]


def generate(client, *args, **kwargs):
  """(images, status markdown, details) of one request."""
  gallery, status, details = client.predict(*fields(*args, **kwargs), api_name="/generate")
  return gallery_pixels(gallery), status, details, gallery


def test_images_seeds_and_links(served):
  client, _ = served
  images, status, details, gallery = generate(client, "a red circle\ntwo blue squares", 2,
                                              seed=5, top_k=32)
  assert len(images) == 4 and all(x.shape == (32, 32, 3) for x in images)
  assert [g["caption"] for g in gallery] == [
      "a red circle | seed 5, sample 0", "a red circle | seed 5, sample 1",
      "two blue squares | seed 5, sample 0", "two blue squares | seed 5, sample 1"]
  assert details["settings"] == dict(guidance=1.5, temperature=0.2, top_k=32, top_p=1.0,
                                     sjd=False, keep=0, upsample=False)
  assert [(x["prompt"], x["seed"], x["sample"]) for x in details["images"]] == [
      ("a red circle", 5, 0), ("a red circle", 5, 1), ("two blue squares", 5, 0),
      ("two blue squares", 5, 1)]
  link = details["images"][3]["link"]
  assert link.startswith("?prompt=two+blue+squares&n=1&seed=5&start=1&") and "top_k=32" in link
  assert "4 images drawn" in status and f"[draw again]({link})" in status
  # The link's fields draw that image again, alone.
  again, *_ = generate(client, "two blue squares", 1, seed=5, start=1, top_k=32)
  np.testing.assert_array_equal(again[0], images[3])
  assert not np.array_equal(images[0], images[1])  # samples of a prompt differ
  other, *_ = generate(client, "a red circle", 2, seed=6, top_k=32)
  assert not np.array_equal(other[0], images[0])  # and so do seeds


def rest_generate(url: str, *args, **kwargs) -> list:
  """/generate's outputs through the REST API (as a browser's page or curl asks)."""
  event = httpx.post(f"{url}/gradio_api/call/generate", json=dict(data=fields(*args, **kwargs)))
  kind = None
  with httpx.stream("GET", f"{url}/gradio_api/call/generate/{event.json()['event_id']}",
                    timeout=300) as events:
    for line in events.iter_lines():
      if line.startswith("event: "):
        kind = line[7:]
      elif line.startswith("data: ") and kind == "complete":
        return json.loads(line[6:])
  raise AssertionError(f"no answer: {kind}")


def test_images_are_served_as_pngs_and_nothing_else_is(served):
  client, _ = served
  url = client.src.rstrip("/")
  gallery, _, _ = rest_generate(url, "two blue squares", 2, seed=5)
  expected, *_ = generate(client, "two blue squares", 2, seed=5)
  for item, pixels in zip(gallery, expected, strict=True):
    image = item["image"]
    assert image["url"].startswith(f"{url}/gradio_api/file=") and image["orig_name"].endswith(
        ".png")
    answer = httpx.get(image["url"])
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.headers["content-disposition"] == f'inline; filename="{image["orig_name"]}"'
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(answer.content))), pixels)
  # Beside the images, or outside their folder, Gradio's own checks answer.
  folder = pathlib.Path(gallery[0]["image"]["path"]).parent.parent
  for path in ("/etc/passwd", f"{folder}/../../etc/passwd", f"{folder}/missing.png"):
    assert httpx.get(f"{url}/gradio_api/file={path}").status_code in (403, 404), path


def test_concurrent_requests_share_decodes_and_draw_what_each_draws_alone(served):
  client, log = served
  alone, _, details, _ = generate(client, "a green triangle", 4, seed=11)
  assert details["batches"][0]["requests"] == 1
  requests = [fields("a green triangle", 4, seed=11)] + [
      fields(f"{n} blue squares", 4, seed=i) for i, n in enumerate(("two", "three", "four"))] + [
      fields(f"a {c} circle", 4, seed=20 + i) for i, c in enumerate(("red", "gray", "purple",
                                                                       "yellow"))]
  jobs = [client.submit(*r, api_name="/generate") for r in requests]
  answers = [job.result(timeout=300) for job in jobs]
  np.testing.assert_array_equal(np.stack(gallery_pixels(answers[0][0])), np.stack(alone))
  batches = {b["number"]: b for _, _, d in answers for b in d["batches"]}
  assert sum(b["rows"] for b in batches.values()) == 32
  # 8 requests of 4 images in fewer decodes than requests: they were batched.
  assert len(batches) < len(requests) and max(b["requests"] for b in batches.values()) > 1, \
      batches
  # The server logs every request and every decode, with timings (this test's own requests:
  # under pytest-xdist the module's other tests may run in another process, another server).
  text = log.read_text()
  assert "1 prompts x 4 images, seed 11" in text and " decode " in text
  assert any(f"batch {b['number']}: {b['rows']} rows of {b['requests']} requests" in text
             for b in batches.values())


@pytest.mark.parametrize("change, message", [
    (dict(prompts=""), "the prompt is empty"),
    (dict(prompts="  \n \n"), "the prompt is empty"),
    (dict(num_images="abc"), "num_images: 'abc' is not a number"),
    (dict(num_images=0), "num_images = 0 is out of range: from 1 to 16"),
    (dict(num_images=MAX_IMAGES + 1), "num_images = 17 is out of range"),
    (dict(prompts="a\nb\nc", num_images=6), "3 prompts x 6 images = 18 images; this server "
                                            "draws at most 16 per request"),
    (dict(guidance=99), "guidance = 99 is out of range: from 0.0 to 20.0"),
    (dict(guidance=None), "guidance is empty"),
    (dict(temperature=-1), "temperature = -1 is out of range"),
    (dict(temperature="nan"), "temperature = 'nan' is out of range"),
    (dict(top_k=2.5), "top_k = 2.5 is not a whole number"),
    (dict(top_k=65), "top_k = 65 is out of range: from 0 to 64"),
    (dict(top_p=0), "top_p = 0 is out of range: above 0.0 to 1.0"),
    (dict(seed=-1), "seed = -1 is out of range"),
    (dict(sjd="maybe"), "sjd: expected true or false, got 'maybe'"),
    (dict(prompts="x" * 20_000), "prompts: 20000 characters; at most 10000"),
    (dict(keep=1), "keep = 1: this server has no reranker to choose the best (it starts "
                   "with --rerank RUN)"),
    (dict(keep=5), "keep = 5 is out of range: from 0 to 4"),
    (dict(upsample=True), "upsample: this server has no upsampler"),
])
def test_bad_input_is_refused_with_a_message_and_the_server_goes_on(served, change, message):
  client, _ = served
  with pytest.raises(AppError) as e:
    client.predict(*fields(**change), api_name="/generate")
  assert message in str(e.value)
  images, *_ = generate(client, "a red circle", 1)  # still serving
  assert len(images) == 1


def test_a_long_prompt_is_drawn_truncated_with_a_warning(served):
  client, _ = served
  long = "a very long prompt about " + "many green triangles " * 12
  images, status, details, _ = generate(client, long, 2)
  assert len(images) == 2
  [warning] = details["warnings"]
  head = "prompt 1 is longer than the model's 16 text tokens; it reads only '"
  assert warning.startswith(head) and warning.endswith("'"), warning
  read = warning[len(head):-1]  # what the model reads: the prompt's start
  assert len(read) > 5 and long.startswith(read) and len(read) < len(long.strip())
  assert "**Warning:** prompt 1 is longer" in status


def wait_until(condition, what: str, timeout_s=120):
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f"never: {what}"
    time.sleep(0.05)


def test_request_folders_go_a_day_after(tmp_path):
  # A request's images are downloaded after its answer: its folder stays, for a day.
  old, new = tmp_path / "request_1", tmp_path / "request_2"
  for folder in (old, new):
    folder.mkdir()
    (folder / "image.png").write_bytes(b"png")
  os.utime(old, (time.time() - 90_000,) * 2)
  before = set(threading.enumerate())
  stop = serve._remove_old_folders(epath.Path(tmp_path), every_s=0.05, age_s=86_400)
  (sweeper,) = [t for t in set(threading.enumerate()) - before if t.name == "old images"]
  try:
    wait_until(lambda: not old.exists(), "the old folder removed", timeout_s=30)
    assert (new / "image.png").exists()
  finally:
    stop.set()
  sweeper.join(timeout=5)  # it does not outlive the test in this worker
  assert not sweeper.is_alive()


@pytest.fixture(scope="module")
def folder_server(workdir, tmp_path_factory):
  """The run exported as a model folder, served with one request decoding at a time and one
  waiting; a request of fewer than 8 rows waits 3 s for others."""
  folder = tmp_path_factory.mktemp("model") / "tiny"
  model_folder.export(workdir, folder, progress=False)
  with server(None, tmp_path_factory.mktemp("serve") / "server.log", "--model", str(folder),
              "--batch_sizes", "8", "--batch_wait_ms", "3000", "--max_users", "1",
              "--queue_size", "1", "--nowarmup") as (url, log):
    yield gradio_client.Client(url, verbose=False), url, log


def test_a_model_folder_draws_the_runs_images(served, folder_server):
  from_run, *_ = generate(served[0], "two blue squares\na red circle", 2, seed=3)
  from_folder, *_ = generate(folder_server[0], "two blue squares\na red circle", 2, seed=3)
  np.testing.assert_array_equal(np.stack(from_folder), np.stack(from_run))


def test_a_full_queue_says_retry_and_the_server_goes_on(folder_server):
  client, url, log = folder_server
  started = log.read_text().count(" from 127.0.0.1: ")
  first = client.submit(*fields("a red circle", 4), api_name="/generate")
  # Its handler runs (the log has it) and waits 3 s for company: the one worker is busy.
  wait_until(lambda: log.read_text().count(" from 127.0.0.1: ") > started, "first started")
  second = client.submit(*fields("a blue square", 4), api_name="/generate")
  queued = lambda: httpx.get(f"{url}/gradio_api/queue/status").json()["queue_size"] == 1
  wait_until(queued, "second queued")
  third = client.submit(*fields("a gray star", 4), api_name="/generate")
  with pytest.raises(QueueError, match="Queue is full! Please try again"):
    third.result(timeout=60)
  assert len(first.result(timeout=300)[0]) == 4 and len(second.result(timeout=300)[0]) == 4
  images, *_ = generate(client, "a gray star", 1)
  assert len(images) == 1


def test_a_request_larger_than_a_decode_fills_the_grid_in(folder_server):
  job = folder_server[0].submit(*fields("a red circle\na blue square", 8), api_name="/generate")
  gallery, _, details = job.result(timeout=300)
  assert len(gallery) == 16 and [b["rows"] for b in details["batches"]] == [8, 8]
  assert [len(out[0]) for out in job.outputs()] == [8, 16]  # the grid after each decode


def test_the_command_wants_one_model(tmp_path):
  for args in ([], ["--workdir", "a", "--model", "b"], ["--model", "b", "--step", "3"]):
    out = subprocess.run([sys.executable, "-m", "parti_jax.serve", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "error: " in out.stderr and "Traceback" not in out.stderr
  out = subprocess.run([sys.executable, "-m", "parti_jax.serve", "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "no config.json; not a training run" in out.stderr
