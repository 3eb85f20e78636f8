"""Config defaults shared by every Parti config, and the checks run before compiling.

`configs/parti_*.py` call `base()` and set what differs. Every field can be overridden
on the command line, e.g. `--config.model.d_model=512`. `check()` refuses a config
that cannot run on the given devices, naming the fields, before anything is compiled.
"""

import math

import jax
import ml_collections

# Priority-ordered logical-to-mesh rules: for each array, the rules are tried in order
# and a mesh axis is used at most once per array. `batch` comes first, so activations
# (batch, length, embed) shard the batch over data+fsdp and leave `embed` whole, while
# parameters, which have no batch axis, shard `embed` over fsdp (ZeRO-3 style FSDP).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    # The residual stream's length under model.sequence_parallel (layers.py: RESIDUAL).
    ("residual_length", "tensor"),
    ("layers", None),
)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "parti"  # what the trainer trains (parti_jax.tasks.TASKS)
  c.seed = 0
  c.global_batch_size = 8192
  c.grad_accum_steps = 1  # micro-batches per step; gradients are averaged over them
  c.num_train_steps = 450_000

  m = c.model = ml_collections.ConfigDict()
  m.text_vocab_size = 16_000  # SentencePiece vocabulary; padded to a multiple of 128
  m.text_len = 128
  m.image_grid = 32  # image tokens form an image_grid x image_grid raster
  m.codebook_size = 8192
  m.d_model = 1024
  m.num_heads = 16
  m.head_dim = -1  # -1: d_model // num_heads
  m.mlp_dim = 4096
  m.encoder_layers = 12
  m.decoder_layers = 12
  m.dropout_rate = 0.1
  m.dtype = "bfloat16"  # compute dtype of projections and feed-forward; params are float32
  m.decoder_attention = "dense"  # "dense" (causal) or "conv" (the paper's conv-shaped local mask)
  m.conv_kernel_rows = 9  # conv mask: rows above (and including) the query's row
  m.conv_kernel_cols = 9  # conv mask: columns centred on the query's column
  # 2-D rotary embeddings in the decoder's self-attention, on top of the learned positions
  # (parti_jax.models.parti): attention sees row and column offsets, the same at every place.
  m.image_rope = False
  # 1-D rotary embeddings in the encoder's self-attention, on top of the learned positions:
  # attention sees word offsets, which bind a color word to the shape after it.
  m.text_rope = False
  m.share_image_embedding = True  # decoder input embedding doubles as the output projection
  # The output projection's matmul: "float32" (inputs cast up, the paper's float32 logits) or
  # "compute" (inputs in model.dtype, accumulated in float32: logits still float32).
  m.logits_matmul = "float32"
  # > 0: the training and evaluation loss make the float32 logits this many image positions
  # at a time, rematerialised in the backward pass, so the whole [batch, positions, vocab]
  # tensor never exists at once (parti_jax/tasks/parti.py: chunked_cross_entropy). It must
  # divide image_grid ** 2. 0: the whole logits tensor, as the sampler makes it.
  m.loss_chunk = 0
  # "none", "full", "dots" (keep matmul outputs, recompute the rest), "qkv_up" (keep only
  # what is split over the tensor axis: q/k/v, attention outputs, the MLP's hidden layer) or
  # "auto": "dots" on GPUs, where it measured fastest, "none" elsewhere
  # (parti_jax/models/layers.py: resolve_remat).
  m.remat = "auto"
  # Sequence parallelism: the residual stream between sublayers (what the backward pass keeps
  # of every layer) has its length split over the mesh axes of the "residual_length" rule
  # (tensor); False keeps it whole on every tensor shard (parti_jax/models/layers.py).
  m.sequence_parallel = True
  # Layers per iteration of each scanned stack. 1 keeps compile time flat in depth; a tiny
  # model on a CPU steps about a third faster with all its layers in one iteration (the
  # demo's Parti: 55 ms against 81; configs/demo_parti.py). On an H200 the planner's
  # roofline puts 350M's train step with every layer unrolled 10% lower with remat dots
  # (the scans' slices and zero-filled buffers go) and its decode step 7% lower, for more
  # compile time (3-5x); not yet timed on a card (BENCHMARKS.md, 2026-12-05).
  m.scan_unroll = 1
  # "auto": the Pallas splash kernel on TPUs (parti_jax/models/splash.py); cuDNN's fused
  # attention on NVIDIA GPUs where it applies (16-bit matmuls, heads at most 128 wide in
  # multiples of 8; parti_jax/models/layers.py: attention_impl); XLA's everywhere else. On
  # an H200 the fused kernel nearly doubles 350M training throughput (BENCHMARKS.md).
  # "xla", "cudnn" or "splash" force one ("splash" off a TPU: Pallas' interpreter, slow).
  m.attention_impl = "auto"

  # num_slices > 1: TPU slices joined over the data-centre network (DCN). The data axis is
  # split across them, fsdp and tensor stay inside each slice (parti_jax/sharding.py).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_slices=1))
  c.sharding_rules = DEFAULT_RULES

  o = c.optimizer = ml_collections.ConfigDict()
  o.name = "adafactor"  # or "adamw"
  o.learning_rate = 4.5e-5
  o.b1 = 0.9
  o.b2 = 0.96  # Adafactor: constant second-moment decay, as in the paper
  o.weight_decay = 4.5e-2  # decoupled: scaled by the learning rate, as in AdamW
  o.grad_clip_norm = 4.0
  # First moment kept in low precision: "float32", "bfloat16", or "int8" (Adafactor only,
  # as the paper stored it: int8 values in blocks of momentum_block entries along each
  # parameter's last axis, one float32 scale per block; parti_jax/quantized.py).
  o.momentum_dtype = "bfloat16"
  o.momentum_block = 128

  s = c.schedule = ml_collections.ConfigDict()
  s.name = "warmup_exponential"  # or "warmup_cosine", "warmup_constant", "warmup_rsqrt"
  s.warmup_steps = 5000
  s.decay_start = 85_000  # warmup_exponential: decay begins here ...
  s.final_ratio = 0.025  # ... and reaches this fraction of the peak at num_train_steps

  c.data = data_defaults()
  c.train = train_defaults()
  c.init_from = ""  # a run's workdir (or checkpoint step dir) whose parameters start this one
  return c


def train_defaults() -> ml_collections.ConfigDict:
  """`config.train`: the training loop, checkpoints, faults, metrics."""
  t = ml_collections.ConfigDict()
  t.log_every = 100  # steps between metric writes (and progress lines off a terminal)
  t.eval_every = 5000  # steps between evaluations on data.eval (0: never; always at the end)
  t.eval_batch_size = 0  # 0: global_batch_size
  t.checkpoint_every = 1000  # steps between (asynchronous) checkpoints; always at the end
  t.keep_checkpoints = 3  # the last K are kept ...
  t.keep_every = 0  # ... and every checkpoint whose step is a multiple of this (0: none)
  t.async_checkpoints = True
  # An asynchronous save still unfinished after this long fails the run instead of hanging
  # it (a 20B state is ~250 GB; writing it from 64 hosts takes minutes, not tens of them).
  t.checkpoint_timeout_s = 1800
  # Reads of a checkpoint that fail are tried this many times (transient storage errors)
  # before the checkpoint counts as unreadable and is set aside.
  t.restore_attempts = 3
  # JAX's persistent compilation cache: "" is WORKDIR/compilation_cache (a restart on
  # the same slice skips compiling), "off" disables it, anything else is the directory.
  t.compilation_cache = ""
  t.nan_policy = "skip"  # a non-finite loss or gradient: "skip" the update, or "halt"
  t.max_consecutive_skips = 20  # this many skipped updates in a row stop the run
  t.inject_nan_steps = ()  # fault injection (tests): these steps get a NaN loss
  t.profile_steps = ()  # (first, last): capture a jax.profiler trace of these steps
  # The jax.random implementation of the state's key (dropout masks, random crops):
  # "threefry" (JAX's default), "rbg" or "unsafe_rbg" (random bits from the accelerator's
  # generator: much cheaper than threefry on GPUs, as MaxText uses). Restarts are exact with
  # each; a run resumes with the implementation it was saved with.
  t.prng_impl = "threefry"
  # Keep the checkpoint of the best evaluation in WORKDIR/checkpoints_best (parameters only),
  # beside the last ones; `sample --step best`, `init_from=RUN@best` (parti_jax/keep_best.py).
  t.keep_best = False
  t.best_metric = "eval/loss"  # an evaluation metric of the task ("eval/l2" for a tokenizer)
  t.best_mode = "min"  # "min" or "max": which end of best_metric is best
  t.worse_evals_note = 3  # a note when best_metric got worse at this many evaluations in a row
  return t


def data_defaults() -> ml_collections.ConfigDict:
  """`config.data`: what `parti_jax.data.pipeline` reads; configs set `train` and `eval`."""
  d = ml_collections.ConfigDict()
  d.kind = "tokens"  # "tokens" (token shards) or "images" (image shards or a TFDS source)
  d.train = ""  # shard set directory, or "tfds:NAME/SPLIT" for a prepared TFDS dataset
  d.eval = ""  # same forms; read once per evaluation, in order, padded to whole batches
  d.tfds_data_dir = ""  # where TFDS datasets are prepared ("": TFDS's default)
  d.tfds_image_feature = "image"
  d.tfds_caption_feature = "caption"
  d.spm_model = ""  # SentencePiece model (PREFIX.model) that tokenizes captions of image shards
  d.resolution = 256
  d.value_range = (-1.0, 1.0)  # pixels are scaled to this range
  d.caption_dropout = 0.1  # training: caption replaced by the unconditional input (guidance)
  # Threads reading and decoding records; -1: 8 for images (PIL releases the GIL while it
  # decodes), 0 for token records, which are so cheap that a pool only adds overhead.
  d.num_threads = -1
  # > 0: batches are made in this many worker processes. The order of batches depends on
  # it (grain deals records to workers), so resume with the count you saved with.
  d.num_workers = 0
  d.prefetch_batches = 2
  d.max_bad_fraction = 0.05  # a shard with more bad records than this stops the run
  d.max_pixels = 100_000_000  # larger images are skipped as image_too_large
  # Where ArrayRecord readers keep each shard's record index: "in_memory" (one read per
  # record; 19.6 bytes per record per reader measured, ~20 GB per process for a billion
  # records), "offloaded" (read from the file as needed: a second read per record, 1.9
  # bytes per record; benchmarks/reader_index_memory.py), or "auto": offloaded from
  # OFFLOAD_INDEX_RECORDS records on (parti_jax.data.pipeline).
  d.reader_index = "auto"
  return d


def tiny_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a model that trains in seconds on a laptop CPU."""
  m = c.model
  m.text_vocab_size = 256
  m.text_len = 16
  m.image_grid = 4
  m.codebook_size = 64
  m.d_model = 64
  m.num_heads = 4
  m.mlp_dim = 256
  m.encoder_layers = 2
  m.decoder_layers = 2
  m.dropout_rate = 0.0
  m.dtype = "float32"
  c.global_batch_size = 8
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum_dtype = "float32"
  c.schedule.name = "warmup_constant"
  c.schedule.warmup_steps = 10
  c.num_train_steps = 200
  c.train.update(log_every=10, eval_every=100, checkpoint_every=50)
  return c


def vitvqgan_base() -> ml_collections.ConfigDict:
  """Defaults of the ViT-VQGAN image tokenizer (stage 1): the paper's Small-Small."""
  c = ml_collections.ConfigDict()
  c.task = "vitvqgan"
  c.seed = 0
  c.global_batch_size = 256
  c.num_train_steps = 500_000
  m = c.model = ml_collections.ConfigDict()
  m.resolution = 256
  m.patch_size = 8  # 256 px -> 32x32 codes
  m.codebook_size = 8192
  m.code_dim = 32  # factorized lookup space
  m.commitment = 0.25
  # Off by default: every N steps, entries unused in that step's global batch restart from
  # the batch's worst-fitted latents (parti_jax/tasks/vitvqgan.py: restart_dead_codes).
  m.dead_code_restart_every = 0
  m.dead_code_restart_until = -1  # no restarts from this step on (-1: restarts to the end)
  # Steps at the start in which the decoder sees the encoder's continuous latents, not their
  # codes, while the codebook follows the latents (its loss and restarts): see
  # parti_jax/models/vitvqgan.py. 0: quantized from the first step, as in the paper.
  m.quantize_start = 0
  m.logit_laplace = True  # decoder also predicts per-pixel scales (Parti's decoder: False)
  m.encoder = ml_collections.ConfigDict(dict(d_model=512, num_heads=8, mlp_dim=2048, layers=8))
  m.decoder = ml_collections.ConfigDict(dict(d_model=512, num_heads=8, mlp_dim=2048, layers=8))
  m.dtype = "bfloat16"
  m.dropout_rate = 0.0
  m.remat = "none"
  m.scan_unroll = 1  # as in Parti's model config
  m.attention_impl = "auto"  # as in Parti's model config
  # StyleGAN-style discriminator (parti_jax/models/discriminator.py): channels at full resolution,
  # doubling per halving up to max_channels. channels=0: no discriminator.
  m.discriminator = ml_collections.ConfigDict(dict(channels=64, max_channels=512))
  c.loss = ml_collections.ConfigDict()
  c.loss.l2 = 1.0
  c.loss.logit_laplace = 0.1
  # LPIPS-style VGG-16 distance; its weights come from `python -m parti_jax.convert.vgg16`.
  # Without a file the term is off, with a warning ("random:SEED" is for tests only).
  c.loss.perceptual = 0.1
  c.loss.perceptual_weights = ""
  # Non-saturating GAN loss, from adversarial_start on (our choice: after the warm-up, once
  # reconstructions are reasonable); r1 is the gamma of the R1 penalty (0: off).
  c.loss.adversarial = 0.1
  c.loss.adversarial_start = 50_000
  c.loss.r1 = 0.0
  o = c.optimizer = ml_collections.ConfigDict()
  o.name, o.learning_rate, o.b1, o.b2 = "adamw", 1e-4, 0.9, 0.99
  o.weight_decay, o.grad_clip_norm, o.momentum_dtype = 1e-4, 1.0, "float32"
  # The discriminator's own Adam, on the same schedule shape with its own peak.
  c.discriminator_optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, b1=0.9, b2=0.99, weight_decay=1e-4, grad_clip_norm=1.0))
  # 50k warm-up steps to 1e-4, then cosine to 5e-5 at the end.
  c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=50_000,
                                              decay_start=0, final_ratio=0.5))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_slices=1))
  # The discriminator's convolutions ("channels") are replicated: it is small next to the
  # tokenizer.
  c.sharding_rules = DEFAULT_RULES + (("patch", None), ("code", None), ("codes", None),
                                      ("channels", None), ("channels_in", None))
  c.data = data_defaults()
  c.data.kind = "images"
  c.train = train_defaults()
  c.init_from = ""
  c.init_from_groups = ()  # only these top-level parameter groups from init_from (empty: all)
  c.optimizer.frozen = ()  # top-level parameter groups that are not trained
  return c


def vit_size(name: str) -> dict:
  """One side (encoder or decoder) of the paper's ViT-VQGAN sizes."""
  return {"small": dict(d_model=512, num_heads=8, mlp_dim=2048, layers=8),
          "base": dict(d_model=768, num_heads=12, mlp_dim=3072, layers=12),
          "large": dict(d_model=1280, num_heads=16, mlp_dim=5120, layers=32)}[name]


def vitvqgan(encoder: str, decoder: str) -> ml_collections.ConfigDict:
  """`vitvqgan_base()` with the paper's named sizes for the two sides."""
  c = vitvqgan_base()
  c.model.encoder.update(vit_size(encoder))
  c.model.decoder.update(vit_size(decoder))
  return c


# ----------------------------------------------------------------------------- checks

MESH_AXES = ("data", "fsdp", "tensor")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
REMAT_POLICIES = ("auto", "none", "full", "dots", "qkv_up")
PRNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")
SCHEDULES = ("warmup_exponential", "warmup_cosine", "warmup_constant", "warmup_rsqrt")
VOCAB_MULTIPLE = 128  # vocabularies are padded so the logits tile evenly on TPU lanes


class ConfigError(ValueError):
  """A config that cannot run; the message names the offending fields."""


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


def head_dim(m: ml_collections.ConfigDict) -> int:
  return m.head_dim if m.head_dim > 0 else m.d_model // m.num_heads


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves `config.mesh` (a -1 means "the rest") against the number of devices."""
  sizes = [int(config.mesh[a]) for a in MESH_AXES]
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"at most one mesh axis may be -1; got {', '.join('mesh.' + a for a in fill)}")
  bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad:
    raise ConfigError(f"mesh axis sizes must be positive or -1: {', '.join(bad)}")
  fixed = math.prod(s for s in sizes if s != -1)
  desc = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if fixed > num_devices or (fill and num_devices % fixed) or (not fill and fixed != num_devices):
    raise ConfigError(
        f"mesh ({desc}) needs {fixed}{' x k' if fill else ''} devices but {num_devices} "
        f"are available")
  shape = tuple(num_devices // fixed if s == -1 else s for s in sizes)
  _check_slices(int(config.mesh.get("num_slices", 1)), shape)
  return shape


def _check_slices(num_slices: int, shape: tuple[int, ...]) -> None:
  """Only the data axis crosses slices: fsdp and tensor communicate every layer, far too
  often for the data-centre network between slices."""
  if num_slices < 1:
    raise ConfigError(f"mesh.num_slices={num_slices} must be at least 1")
  if shape[0] % num_slices:
    raise ConfigError(
        f"mesh.data={shape[0]} is not divisible by mesh.num_slices={num_slices}: the data axis "
        "is split across the slices (fsdp and tensor stay inside one); set mesh.data to a "
        "multiple of mesh.num_slices")


def check(config: ml_collections.ConfigDict, num_devices: int | None = None,
          training: bool = True) -> tuple[int, ...]:
  """Refuses a config that cannot run, before compiling. Returns the resolved mesh shape.

  The mesh is checked here, the model, batch and losses by the config's task
  (`config_problems` of its module in parti_jax.tasks). `training=False` (inference)
  checks the model and mesh only: no batch, optimizer or loss.
  """
  from parti_jax import tasks  # the tasks import this module: resolved at call time
  num_devices = jax.device_count() if num_devices is None else num_devices
  shape = mesh_shape(config, num_devices)
  task = tasks.of(config)  # an unknown task is refused here, naming the known ones
  problems = task.config_problems(config, dict(zip(MESH_AXES, shape)), training)
  if training:
    problems += best_problems(config, getattr(task, "EVAL_METRICS", None))
    impl = config.get("train", {}).get("prng_impl", "threefry")
    if impl not in PRNG_IMPLS:
      problems.append(f"train.prng_impl={impl!r} is not one of {PRNG_IMPLS}")
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
  return shape


def best_problems(config: ml_collections.ConfigDict, eval_metrics) -> list[str]:
  """`train.keep_best` needs evaluations to rank, and a metric they report (`eval_metrics`:
  the task's, None when it does not list them)."""
  t = config.train
  if not t.get("keep_best"):
    return []
  problems = []
  if not config.data.get("eval"):
    problems.append("train.keep_best=True needs evaluations, but data.eval is empty")
  if not t.eval_every:
    problems.append("train.keep_best=True needs evaluations during training, but "
                    "train.eval_every=0 evaluates only at the end")
  if t.best_mode not in ("min", "max"):
    problems.append(f"train.best_mode={t.best_mode!r} is not 'min' or 'max'")
  if eval_metrics is not None and t.best_metric not in [f"eval/{m}" for m in eval_metrics]:
    problems.append(f"train.best_metric={t.best_metric!r} is not one of the task's evaluation "
                    f"metrics {[f'eval/{m}' for m in eval_metrics]}")
  return problems


def ways(config: ml_collections.ConfigDict, sizes: dict, logical: str) -> tuple[int, str]:
  """How many shards the mesh axes that `logical` maps to (its first rule) make, and their
  description ("mesh.fsdp=8 x mesh.tensor=2")."""
  rules = dict()
  for name, mesh_axes in config.sharding_rules:
    rules.setdefault(name, mesh_axes)  # first rule wins for these whole-dimension checks
  axes = rules.get(logical)
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return math.prod(sizes[a] for a in axes), " x ".join(f"mesh.{a}={sizes[a]}" for a in axes)


def layer_problems(m: ml_collections.ConfigDict) -> list[str]:
  """Fields both models' layer stacks read (parti_jax/models/layers.py: Stack, Attention)."""
  problems = []
  unroll = m.get("scan_unroll", 1)
  if unroll < 1:
    problems.append(f"model.scan_unroll={unroll} must be at least 1 (layers per iteration)")
  impl = m.get("attention_impl", "auto")
  if impl not in ATTENTION_IMPLS:
    problems.append(f"model.attention_impl={impl!r} is not one of {ATTENTION_IMPLS}")
  elif impl == "cudnn" and m.dtype == "float32":
    problems.append("model.attention_impl='cudnn' needs model.dtype bfloat16 or float16 "
                    "(cuDNN's fused attention has no float32 kernel); 'auto' picks XLA's here")
  return problems
