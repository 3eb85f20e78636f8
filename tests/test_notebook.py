"""The Colab notebook runs from top to bottom against a tiny checkpoint trained here."""

import re

import nbformat
from conftest import ROOT
from nbclient import NotebookClient
from sampling_helpers import tiny_run

NOTEBOOK = ROOT / "notebooks" / "sampling.ipynb"


def set_parameters(notebook, **values):
  """Replaces `NAME = ...` in the cell tagged "parameters", keeping its form comments."""
  (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  for name, value in values.items():
    cell.source, count = re.subn(rf"^{name} = .*?(  # @param.*)?$", rf"{name} = {value!r}\1",
                                 cell.source, flags=re.M)
    assert count == 1, name


def test_the_notebook_samples_a_trained_checkpoint(tmp_path_factory):
  workdir = tiny_run(tmp_path_factory)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  set_parameters(notebook, CHECKPOINT=str(workdir), INSTALL=False, NUM_SAMPLES=4,
                 PROMPTS="a red circle | two blue squares", SJD=True)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert f"{workdir} step 150" in text and "8 images in" in text
  pictures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pictures) == 2  # a grid per prompt


def test_the_notebook_samples_a_model_folder_alone(tmp_path_factory, tmp_path):
  """A folder from `python -m parti_jax.export`, with the run moved away: no orbax, no run."""
  from parti_jax import model_folder
  workdir = tiny_run(tmp_path_factory)
  folder = tmp_path / "folder"
  model_folder.export(workdir, folder, progress=False)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  set_parameters(notebook, CHECKPOINT=str(folder), INSTALL=False, NUM_SAMPLES=2,
                 PROMPTS="a red circle", SJD=False)
  root = workdir.parent
  root.rename(root.with_name(root.name + "_parked"))
  try:
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
  finally:
    root.with_name(root.name + "_parked").rename(root)
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert f"{folder} step 150" in text and "2 images in" in text
  assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1


def test_the_notebook_is_valid_with_a_form():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  for name in ("CHECKPOINT", "PROMPTS", "NUM_SAMPLES", "GUIDANCE", "SEED", "SJD", "PACKAGE"):
    assert re.search(rf"^{name} = .*  # @param", cell.source, flags=re.M), name
  assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


def test_the_notebook_form_starts_at_the_project_sampling_defaults():
  """A Colab form holds literals, so the notebook cannot import the defaults: it must state
  the ones `decoding.Settings` holds (and the sample command takes from there)."""
  from parti_jax import decoding
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  form = {name: float(re.search(rf"^{name} = ([0-9.]+)", cell.source, flags=re.M)[1])
          for name in ("GUIDANCE", "TEMPERATURE", "TOP_K", "TOP_P")}
  defaults = decoding.Settings()
  assert form == dict(GUIDANCE=defaults.guidance, TEMPERATURE=defaults.temperature,
                      TOP_K=defaults.top_k, TOP_P=defaults.top_p)
