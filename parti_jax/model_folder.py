"""A model folder: a trained model to share, readable without orbax or its training run.

  DIR/model.json                     what is here: format version, stages, files and sizes
  DIR/README.md                      the model card (data, steps, metrics, how to sample)
  DIR/model/config.json              the run's resolved config (JSON: data, never code)
  DIR/model/model.safetensors        its parameters, or, past `max_shard_bytes`,
  DIR/model/model-0000K-of-0000N.safetensors + model.safetensors.index.json (as hubs do)
  DIR/image_tokenizer/...            the same for a `vitvqgan:RUN` image tokenizer (a built-in
                                     one, e.g. `color`, is named in model.json instead)
  DIR/spm.model                      the SentencePiece model of the captions
  DIR/preview/                       samples of the preview prompts, when asked for

Parameters are named by their path in the model's parameter tree joined with dots
(`decoder.blocks.mlp.up.kernel`) and stored as they trained (float32). Reading checks every
file against model.json (present, its recorded size, at most what the config's shapes take)
and every tensor against the shape and dtype the config gives, so a folder that is
incomplete or from another version is refused naming the file. Nothing here is unpickled or
run (docs/trust.md). Folders may be in buckets (gs://...).
"""

import dataclasses
import json
import math

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from etils import epath
from tqdm import tqdm

from parti_jax import runs
from parti_jax.data import records, spm

MANIFEST = "model.json"
CARD = "README.md"  # the model card, written last
FORMAT = "parti_jax model folder"
FORMAT_VERSION = 1
MODEL, IMAGE_TOKENIZER = "model", "image_tokenizer"  # the stages' folders
SPM_MODEL = "spm.model"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 << 30  # a file per 2 GB of parameters: a 20B model is ~40 files
MAX_JSON_BYTES = 64 << 20  # model.json and an index are kilobytes to a few megabytes
HEADER_BYTES = 1 << 20  # a safetensors header per file, beyond its tensors' bytes ...
HEADER_BYTES_PER_TENSOR = 1024  # ... plus this per tensor (its name, dtype, shape, offsets)
DTYPES = {"float32": "F32", "float16": "F16", "int32": "I32", "int64": "I64",
          "uint8": "U8", "bool": "BOOL", "float64": "F64"}  # what safetensors' numpy API writes


class FolderError(runs.RunError):
  """A model folder that cannot be read or written; the message names the file."""


def is_model_folder(path) -> bool:
  return (epath.Path(path) / MANIFEST).exists()


# -------------------------------------------------------------------------- parameters


def flat_names(tree) -> dict[str, object]:
  """{dotted name: leaf} of a parameter tree, in the tree's order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in leaves}


def _nbytes(leaf) -> int:
  return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def write_stage(directory: epath.Path, params, max_shard_bytes: int,
                progress: bool = True) -> dict:
  """Writes a parameter tree as safetensors file(s) in `directory`; its model.json entry.

  Tensors are fetched from the devices one file at a time, so the host holds one file's
  worth, not the model.
  """
  named = flat_names(params)
  for name, leaf in named.items():
    if np.dtype(leaf.dtype).name not in DTYPES:
      raise FolderError(f"parameter {name} is {leaf.dtype}, which safetensors' numpy API "
                        "cannot store")
  groups, size = [[]], 0  # names per file, in order; a tensor over the limit is alone
  for name, leaf in named.items():
    if groups[-1] and size + _nbytes(leaf) > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += _nbytes(leaf)
  files = ([WEIGHTS] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
  directory.mkdir(parents=True, exist_ok=True)
  total = sum(_nbytes(leaf) for leaf in named.values())
  bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {directory.name}",
             disable=not progress)
  for file, names in zip(files, groups):
    tensors = {n: np.asarray(jax.device_get(named[n])) for n in names}
    (directory / file).write_bytes(safetensors.numpy.save(tensors, metadata={"format": "np"}))
    bar.update(sum(t.nbytes for t in tensors.values()))
    del tensors
  bar.close()
  entry = dict(weights=[f"{directory.name}/{f}" for f in files], parameters=int(sum(
      math.prod(leaf.shape) for leaf in named.values())), bytes=total)
  if len(files) > 1:
    index = dict(metadata=dict(total_size=total),
                 weight_map={n: f for f, names in zip(files, groups) for n in names})
    (directory / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    entry["index"] = f"{directory.name}/{INDEX}"
  return entry


def read_stage(folder: "Folder", stage: str, abstract_params, groups=()) -> dict:
  """The stage's parameters as arrays with the shardings of `abstract_params` (a tree of
  ShapeDtypeStructs carrying them); only the top-level `groups` when given."""
  entry = folder.stage(stage)
  wanted = flat_names({g: abstract_params[g] for g in groups} if groups else abstract_params)
  weight_map = _weight_map(folder, entry)
  missing = [n for n in wanted if n not in weight_map]
  if missing:
    where = entry.get("index") or entry["weights"][0]
    raise FolderError(f"{folder.path / where}: no parameter {missing[0]}"
                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                      + f"; the config in {folder.path / entry['config']} needs it")
  if not groups:
    extra = sorted(set(weight_map) - set(wanted))
    if extra:
      raise FolderError(f"{folder.path / weight_map[extra[0]]}: parameter {extra[0]} is not "
                        f"in the model {folder.path / entry['config']} describes")
  by_file = {}
  for name in wanted:
    by_file.setdefault(weight_map[name], []).append(name)
  # The largest a file may be: the bytes its tensors take, plus its header.
  allowed = {f: sum(_nbytes(wanted[n]) for n in names) + HEADER_BYTES
             + HEADER_BYTES_PER_TENSOR * len(names) for f, names in by_file.items()}
  loaded = {}
  for file, names in by_file.items():
    path = folder.checked_file(file, allowed[file] if not groups else None)
    loaded.update(_read_tensors(path, names, wanted))
  _, treedef = jax.tree_util.tree_flatten(
      {g: abstract_params[g] for g in groups} if groups else abstract_params)
  return jax.tree_util.tree_unflatten(treedef, [loaded[n] for n in wanted])


def _weight_map(folder: "Folder", entry: dict) -> dict[str, str]:
  """{parameter name: file relative to the folder} of a stage."""
  if "index" not in entry:
    (only,) = entry["weights"]
    path = folder.checked_file(only, None)
    return {name: only for name in _header_names(path)}
  index = folder.read_json(entry["index"])
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise FolderError(f"{folder.path / entry['index']}: no weight_map; not a safetensors index")
  stage_dir = entry["index"].rsplit("/", 1)[0]
  mapped = {name: f"{stage_dir}/{file}" for name, file in weight_map.items()}
  unknown = sorted(set(mapped.values()) - set(entry["weights"]))
  if unknown:
    raise FolderError(f"{folder.path / entry['index']}: names {unknown[0]}, which "
                      f"{folder.path / MANIFEST} does not list")
  return mapped


def _header_names(path: epath.Path) -> list[str]:
  """The tensor names in a safetensors file's header (8 bytes of length, then JSON)."""
  with path.open("rb") as f:
    length = int.from_bytes(f.read(8), "little")
    if length > HEADER_BYTES + HEADER_BYTES_PER_TENSOR * 100_000:
      raise FolderError(f"{path}: a safetensors header of {length:,} bytes; refused")
    try:
      header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError) as e:
      raise FolderError(f"{path} is not a safetensors file ({e})") from None
  if not isinstance(header, dict):
    raise FolderError(f"{path} is not a safetensors file (its header is no JSON object)")
  return [k for k in header if k != "__metadata__"]


def _read_tensors(path: epath.Path, names: list[str], wanted: dict) -> dict:
  """Named tensors of one safetensors file as sharded arrays, each checked first.

  A local file is memory-mapped and each device's slice read from it; a bucket's object
  is read whole (its size already bounded) and parsed from memory.
  """
  def check(name, shape, dtype):
    want = wanted[name]
    if tuple(shape) != tuple(want.shape) or dtype != DTYPES.get(np.dtype(want.dtype).name):
      raise FolderError(f"{path}: parameter {name} is {dtype} {list(shape)}; the model "
                        f"needs {DTYPES.get(np.dtype(want.dtype).name)} {list(want.shape)}")

  def place(name, read):
    want = wanted[name]
    return jax.make_array_from_callback(want.shape, want.sharding,
                                        lambda index: np.asarray(read(index), want.dtype))

  try:
    if "://" in str(path):
      tensors = safetensors.numpy.load(path.read_bytes())
      out = {}
      for name in names:
        if name not in tensors:
          raise FolderError(f"{path}: no parameter {name}")
        t = tensors[name]
        check(name, t.shape, DTYPES.get(t.dtype.name, str(t.dtype)))
        out[name] = place(name, lambda index, t=t: t[index])
      return out
    from safetensors import safe_open
    out = {}
    with safe_open(str(path), framework="numpy") as f:
      present = set(f.keys())
      for name in names:
        if name not in present:
          raise FolderError(f"{path}: no parameter {name}")
        tensor = f.get_slice(name)
        check(name, tensor.get_shape(), tensor.get_dtype())
        out[name] = place(name, lambda index, tensor=tensor: tensor[index])
    return out
  except FolderError:
    raise
  except Exception as e:  # noqa: BLE001  safetensors raises its own types for a bad file
    raise FolderError(f"{path}: not a readable safetensors file "
                      f"({type(e).__name__}: {str(e)[:200]})") from None


# ------------------------------------------------------------------------------ reading


@dataclasses.dataclass
class Folder:
  """A model folder opened: its manifest checked, nothing else read yet."""
  path: epath.Path
  manifest: dict

  def stage(self, name: str) -> dict:
    stage = self.manifest["stages"].get(name)
    if not isinstance(stage, dict):
      raise FolderError(f"{self.path / MANIFEST}: no stage {name!r}")
    return stage

  def checked_file(self, name: str, limit: int | None) -> epath.Path:
    """A file the manifest lists: present, of its recorded size, at most `limit` bytes."""
    recorded = self.manifest["files"].get(name)
    if recorded is None:
      raise FolderError(f"{self.path / MANIFEST} does not list {name}")
    path = self.path / name
    if not path.exists():
      raise FolderError(f"{path} is missing: the folder is incomplete ({MANIFEST} lists it)")
    size = path.stat().length
    if size != recorded:
      raise FolderError(f"{path} holds {size:,} bytes, but {MANIFEST} says {recorded:,}: "
                        "it was changed or cut short")
    if limit is not None and size > limit:
      raise FolderError(f"{path}: {size:,} bytes, more than the {limit:,} its tensors may "
                        "take; refused (see docs/trust.md)")
    return path

  def read_json(self, name: str):
    path = self.checked_file(name, MAX_JSON_BYTES)
    try:
      return json.loads(records.read_limited(path, MAX_JSON_BYTES, "a model folder's JSON"))
    except (ValueError, UnicodeDecodeError) as e:
      raise FolderError(f"{path} is not JSON ({e})") from None

  def config(self, stage: str) -> ml_collections.ConfigDict:
    name = self.stage(stage)["config"]
    self.checked_file(name, runs.MAX_CONFIG_BYTES)
    return runs.read_config_file(self.path / name, "a model folder's config")


def open_folder(path) -> Folder:
  """Reads and checks DIR/model.json (its format and version, the files it lists)."""
  path = epath.Path(path) if "://" in str(path) else epath.Path(path).resolve()
  manifest_path = path / MANIFEST
  try:
    manifest = json.loads(records.read_limited(manifest_path, MAX_JSON_BYTES,
                                               "a model folder's model.json"))
  except FileNotFoundError:
    raise FolderError(f"{manifest_path} is missing: not a model folder (python -m "
                      "parti_jax.export writes one), or one whose export did not finish") from None
  except records.DataError as e:
    raise FolderError(str(e)) from None
  except (ValueError, UnicodeDecodeError) as e:
    raise FolderError(f"{manifest_path} is not JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise FolderError(f"{manifest_path} does not describe a parti_jax model folder")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise FolderError(f"{manifest_path}: format version {version!r}, but this parti_jax "
                      f"reads version {FORMAT_VERSION}; export the run again with this version")
  if not isinstance(manifest.get("stages"), dict) or not isinstance(manifest.get("files"), dict):
    raise FolderError(f"{manifest_path}: no stages or files listed")
  return Folder(path, manifest)


def load_stage(folder: Folder, stage: str, mesh=None, mesh_axes: dict | None = None,
               devices=None) -> tuple[ml_collections.ConfigDict, object, dict]:
  """(config, inference Setup, parameters) of a stage, on `mesh` or a mesh of `devices`
  shaped by `mesh_axes` (as `runs.prepare` lays a run out)."""
  config = folder.config(stage)
  setup = runs.inference_setup(config, str(folder.path / folder.stage(stage)["config"]),
                               mesh, mesh_axes, devices)
  return config, setup, read_stage(folder, stage, setup.sharded_abstract_params())


def load_init_params(path, abstract_params, groups=()) -> dict:
  """The model stage's parameters for `--config.init_from=DIR` (`runs.load_init_params`)."""
  return read_stage(open_folder(path), MODEL, abstract_params, groups)


# ------------------------------------------------------------------------------ writing


def export(workdir, out, step: int | str | None = None, tokenizer: str | None = None,
           spm_model: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
           preview: tuple[str, ...] = (), preview_samples: int = 4, progress: bool = True,
           log=print) -> Folder:
  """Writes the model folder of a run's checkpoint `step` (default: the latest; `best`)
  into `out`: its parameters and config, its image tokenizer and SentencePiece model (a
  Parti run's), `preview` prompts sampled from the written folder, and a model card.
  model.json is written after the files it lists, so an export cut short before it is no
  folder; the model card is written last, and an export cut short after model.json (in its
  preview or card) is finished by running it again."""
  from parti_jax import model_card, sampling  # sampling reads folders through this module
  out = epath.Path(out) if "://" in str(out) else epath.Path(out).resolve()
  unfinished = _unfinished(out)
  run = runs.prepare(workdir, step, devices=jax.local_devices())
  config, stages, files = run.config, {}, {}
  task = config.get("task", "parti")
  if task == "parti":  # what decodes its codes and tokenizes its captions: checked first
    try:
      spec, resolution, spm_path = sampling.run_tokenizers(config, tokenizer, spm_model)
    except sampling.SampleError as e:
      raise FolderError(f"{workdir}: {e}") from None
  if unfinished is not None:
    manifest = unfinished.manifest
    exported = manifest.get("source", {}).get("checkpoint")
    if exported != str(run.path):
      raise FolderError(f"{out} holds an unfinished export of {exported}, not of {run.path}; "
                        "choose another --out or remove it")
    log(f"finishing the export of {run.path} to {out}, which stopped before its model card")
  else:
    log(f"exporting {workdir} step {run.step} to {out}")
    stages[MODEL] = _write_run_stage(out / MODEL, workdir, run, run.load_params(),
                                     max_shard_bytes, progress)
    if task == "parti":
      stages[IMAGE_TOKENIZER] = _tokenizer_stage(out / IMAGE_TOKENIZER, spec, resolution,
                                                 max_shard_bytes, progress)
      try:
        data = records.read_limited(spm_path, spm.MAX_MODEL_BYTES, "a SentencePiece model")
      except (OSError, records.DataError) as e:
        raise FolderError(f"cannot read the SentencePiece model {spm_path}: {e}; pass "
                          "--spm") from None
      (out / SPM_MODEL).write_bytes(data)
    for stage in stages.values():
      for name in [stage.get("config"), *stage.get("weights", ()), stage.get("index")]:
        if name:
          files[name] = (out / name).stat().length
    if task == "parti":
      files[SPM_MODEL] = len(data)
    manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, task=task, step=run.step,
                    source=dict(workdir=str(workdir), checkpoint=str(run.path), step=run.step,
                                chosen="best" if step == runs.BEST else
                                ("latest" if step is None else "step")),
                    stages=stages, files=files)
    if task == "parti":
      manifest["spm_model"] = SPM_MODEL
    records.atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
  previewed = None
  if preview and task == "parti":
    previewed = _preview(out, list(preview), preview_samples, progress, log)
  records.atomic_write_text(out / CARD, model_card.text(out, manifest, config, workdir,
                                                        previewed))
  sizes = [f"{name} {stage['parameters']:,} parameters" for name, stage in stages.items()
           if "parameters" in stage]
  log(f"wrote {out}: {', '.join(sizes)}")
  return open_folder(out)


def _unfinished(out: epath.Path) -> Folder | None:
  """The folder an export cut short after model.json left in `out` (its files checked
  against it), or None when `out` holds no model.json; a finished folder is refused."""
  if not (out / MANIFEST).exists():
    return None
  if (out / CARD).exists():
    raise FolderError(f"{out / MANIFEST} exists: {out} already holds a model folder; "
                      "choose another --out or remove it")
  folder = open_folder(out)
  for name in folder.manifest["files"]:
    folder.checked_file(name, None)
  return folder


def _write_run_stage(directory: epath.Path, workdir, run, params, max_shard_bytes,
                     progress) -> dict:
  """A run's parameters and its config.json, as saved, in `directory`."""
  entry = write_stage(directory, params, max_shard_bytes, progress)
  text = records.read_limited(epath.Path(workdir) / "config.json", runs.MAX_CONFIG_BYTES,
                              "a run's config.json")
  (directory / "config.json").write_bytes(text)
  return dict(task=run.config.get("task", "parti"), config=f"{directory.name}/config.json",
              **entry)


def _tokenizer_stage(directory: epath.Path, spec: str, resolution, max_shard_bytes,
                     progress) -> dict:
  """The image tokenizer: a ViT-VQGAN run's weights, or a built-in one's name."""
  name, _, rest = spec.partition(":")
  if name == "color":
    return dict(spec=spec, resolution=resolution)
  if name != "vitvqgan":
    raise FolderError(f"image tokenizer {spec!r}: a model folder holds a vitvqgan:RUN "
                      "tokenizer's weights or names a built-in one (color); a MODULE:FUNCTION "
                      "tokenizer is code, which a folder does not carry (pass --tokenizer)")
  run = runs.prepare(rest, task="vitvqgan", devices=jax.local_devices())
  entry = _write_run_stage(directory, rest, run, run.load_params(), max_shard_bytes, progress)
  return dict(entry, source=dict(spec=spec, step=run.step))


def _preview(out: epath.Path, prompts: list[str], num_samples: int, progress, log) -> dict:
  """Samples of `prompts` drawn from the folder just written, in out/preview (the command
  that does the same is in the model card)."""
  from parti_jax import decoding, sampling
  run = sampling.load_model(out)
  settings = decoding.Settings()
  sampling.generate(run, prompts, settings, num_samples, seed=0, out=out / "preview",
                    progress=progress, log=log)
  quoted = " ".join(f"--prompt {json.dumps(p)}" for p in prompts)
  return dict(prompts=prompts, directory="preview",
              command=f"python -m parti_jax.sample --model {out.name} {quoted} --num_samples "
                      f"{num_samples} --seed 0 --out {out.name}/preview")
