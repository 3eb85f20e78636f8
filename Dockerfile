# The image launch/xpk.sh runs on GKE: Python 3.11 with every dependency pinned in
# launch/constraints.txt (the jax, jaxlib and libtpu the planner was validated with) baked
# in, and this package at /app. A restarted pod starts the trainer at once: nothing is
# installed at run time.
#
#   docker build --tag IMAGE .    # launch/xpk.sh builds from the git HEAD, not the work tree
#
# The dependencies are their own layer, before the code: a rebuild after a code change
# reuses it and pushes only the small code layer.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY launch/constraints.txt /tmp/constraints.txt
RUN pip install --requirement /tmp/constraints.txt

COPY . /app
# --no-deps: everything it needs is pinned above. The checks fail the build, not a pod
# hours later: gcsfs reads and writes gs:// work dirs, and the pins hold.
RUN pip install --no-deps --editable . \
 && pip check \
 && python -c "import gcsfs, jax, parti_jax.train" \
 && python launch/pins.py /tmp/constraints.txt jax jaxlib libtpu gcsfs
